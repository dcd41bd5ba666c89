#!/usr/bin/env python
"""Engine benchmark: memory of one shared base vs the seed's second base copy; act latency.

    .venv/bin/python bench/bench_engine.py [--json results.json] [--runs 5] [--max-new-tokens 16]

Builds (offline, in a temp folder unless ``--workdir``) random Qwen3-VL models with
:func:`vlrouter.core.tiny.build_tiny_model` -- the ``tiny`` preset and the ~100M
``100m`` preset -- three LoRA adapters each (peft, r=8 on every language-model
projection, non-zero B) and a router head, then measures:

* **peak RSS** (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of a fresh process that
  loads and runs one request with, on the 100M model: imports only; the base model
  alone (one greedy generate); an ``Engine`` with 3 adapters (one ``act``); the seed's
  design -- a base model for routing plus a *second* base load wrapped in a PeftModel
  with the 3 adapters for generation (one route + one generate). Each runs in its own
  subprocess so they do not pollute each other.
* **act latency** on CPU, split into route / generate ms (median of ``--runs`` acts,
  greedy, ``max_new_tokens``), for both models, and vision-tower forward calls per act.

A script, not a test: prints a markdown table; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLROUTER_NO_ENTRY_POINTS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NAMES = ["calendar", "claim-window", "provider-select"]
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROMPTS = ["Click March 29 in the calendar", "Type the claim number into the form",
           "Select Dr. Smith from the provider list"]


def _quiet() -> None:
    """The CLI's quieting (no transformers/hub chatter or bars) plus no warnings at all."""
    import warnings

    from vlrouter.cli.ui import quiet_libraries

    quiet_libraries()
    warnings.filterwarnings("ignore")


def _screen(i: int):
    from PIL import Image, ImageDraw

    colors = [(220, 40, 40), (30, 170, 60), (40, 60, 210)]
    img = Image.new("RGB", (320, 240), colors[i % 3])
    d = ImageDraw.Draw(img)
    for k in range(3 + i % 3):
        d.rectangle([20 + 60 * k, 40, 60 + 60 * k, 80], fill=(250, 250, 200))
    return img


def _rss_mib() -> float:
    """Peak RSS of this process (Linux reports ru_maxrss in KiB).

    ru_maxrss survives fork+exec: a child inherits the parent's high-water mark at
    fork time. So the parent forks the measured children while it is still small
    (before importing torch); :func:`_hwm_mib` (this address space only) cross-checks.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


# ---- setup (parent process) ----------------------------------------------------------------

def build_project(root: Path, preset: str) -> Path:
    """Model + 3 LoRA adapters + registry.yaml + a random router head. Returns registry.yaml."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlrouter.core.head import HeadShape, build_head
    from vlrouter.core.store import RouterMeta, save_router
    from vlrouter.core.tiny import build_tiny_model

    model_dir = build_tiny_model(root / f"qwen3-vl-{preset}", preset)
    for i, name in enumerate(NAMES):
        base = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=False)
        get_peft_model(base, cfg).save_pretrained(str(root / "checkpoints" / name))
        del base
    hidden = int(json.loads((model_dir / "config.json").read_text())["text_config"]["hidden_size"])
    torch.manual_seed(0)
    shape = HeadShape(kind="linear", in_dim=hidden, num_labels=len(NAMES))
    save_router(root / "runs" / "router", build_head(shape),
                RouterMeta(adapters=NAMES, base_model=str(model_dir), pooling="mean", layer=-1, hidden_size=hidden,
                           head=shape))
    lines = [f"base_model: {model_dir}", "router:", "  dir: runs/router", "adapters:"]
    for n in NAMES:
        lines += [f"  - name: {n}", f"    dataset: data/{n}/train.jsonl", f"    checkpoint: checkpoints/{n}"]
    reg = root / "registry.yaml"
    reg.write_text("\n".join(lines) + "\n")
    return reg


def run_child(mode: str, registry: Path, max_new_tokens: int, extra: tuple[str, ...] = ()) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--registry", str(registry),
                          "--max-new-tokens", str(max_new_tokens), *extra], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- children (fresh processes) ------------------------------------------------------------

def child(mode: str, registry: Path, max_new_tokens: int) -> dict:
    import torch

    from vlrouter.core.encoder import build_inputs, load_base_model, load_processor
    from vlrouter.core.engine import Engine
    from vlrouter.core.lora import AdapterSource, load_adapters
    from vlrouter.core.registry import Registry
    from vlrouter.core.views import TokenIds, encode_pooled

    _quiet()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if mode == "build":  # registry = the project folder to build; --runs carries nothing here
        preset = registry.name
        return {"mode": mode, "registry": str(build_project(registry, preset))}
    if mode == "latency":
        return {"mode": mode, **latency(registry, int(os.environ["VLROUTER_BENCH_RUNS"]), max_new_tokens)}
    reg = Registry.load(registry)
    image, prompt = _screen(0), PROMPTS[0]
    gen = {"max_new_tokens": max_new_tokens, "do_sample": False}
    params = 0
    if mode == "imports":
        pass
    elif mode == "base":
        proc = load_processor(reg.base_model)
        model = load_base_model(reg.base_model, device="cpu")
        params = sum(p.numel() for p in model.parameters())
        with torch.inference_mode():
            model.generate(**build_inputs(proc, [image], [prompt]), **gen)
    elif mode == "engine":
        engine = Engine.from_registry(registry, device="cpu")
        params = sum(p.numel() for p in engine.model.parameters())
        engine.act(image, prompt, max_new_tokens=max_new_tokens)
    elif mode == "seed":
        # The seed's route_and_generate: an encoder for routing, and load_base_with_loras()
        # -- a SECOND base load with the LoRAs -- for generation.
        proc = load_processor(reg.base_model)
        encoder = load_base_model(reg.base_model, device="cpu")
        lora_model = load_adapters(load_base_model(reg.base_model, device="cpu"),
                                   [AdapterSource(a.name, reg.resolve(a.checkpoint)) for a in reg.adapters])
        params = sum(p.numel() for p in encoder.parameters()) + sum(p.numel() for p in lora_model.parameters())
        batch = build_inputs(proc, [image], [prompt])
        encode_pooled(encoder, batch, token_ids=TokenIds.of(encoder, proc))
        lora_model.set_adapter(NAMES[0])
        with torch.inference_mode():
            lora_model.generate(**batch, **gen)
    else:
        raise SystemExit(f"unknown child mode {mode}")
    return {"mode": mode, "peak_rss_mib": _rss_mib(), "vm_hwm_mib": _hwm_mib(), "params": params}


# ---- latency (parent process) --------------------------------------------------------------

def latency(registry: Path, runs: int, max_new_tokens: int) -> dict:
    from vlrouter.core.engine import Engine
    from vlrouter.core.views import inner_vl_model

    engine = Engine.from_registry(registry, device="cpu")
    calls = []
    handle = inner_vl_model(engine.model).visual.register_forward_hook(lambda *a: calls.append(1))
    engine.act(_screen(0), PROMPTS[0], max_new_tokens=max_new_tokens)  # warm-up
    rows, per_act_calls = [], []
    for i in range(runs):
        calls.clear()
        a = engine.act(_screen(i), PROMPTS[i % 3], max_new_tokens=max_new_tokens)
        per_act_calls.append(len(calls))
        rows.append(a.timings)
    handle.remove()
    base_params = sum(p.numel() for n, p in engine.model.named_parameters() if "lora_" not in n)
    lora_params = sum(p.numel() for n, p in engine.model.named_parameters() if "lora_" in n)
    med = {k: statistics.median(r[k] for r in rows) for k in ("route_ms", "generate_ms", "total_ms")}
    return {**med, "vision_calls_per_act": statistics.median(per_act_calls), "runs": runs,
            "base_params": base_params, "lora_params_3_adapters": lora_params}


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def render(results: dict) -> str:
    """The markdown tables of one run's results (what bench/run prints and the README shows)."""
    mem, lat = results["memory_100m"], results["latency"]
    base, imports = mem["base"]["peak_rss_mib"], mem["imports"]["peak_rss_mib"]
    lines = [
        f"### Memory: peak RSS, 100M preset, fresh process each (CPU, fp32, one request, "
        f"max_new_tokens={results['max_new_tokens']})",
        "",
        "| process holds | peak RSS (MiB) | vs base alone | above imports (MiB) | above imports vs base |",
        "|---|---:|---:|---:|---:|",
        f"| imports only (torch, transformers, peft, vlrouter) | {imports:.0f} | - | - | - |",
    ]
    labels = {"base": "base model alone", "engine": "**Engine, 3 adapters (one shared base)**",
              "seed": "seed design: base for routing + 2nd base in a PeftModel with 3 adapters"}
    for m in ("base", "engine", "seed"):
        rss = mem[m]["peak_rss_mib"]
        lines.append(f"| {labels[m]} | {rss:.0f} | {rss / base:.2f}x | {rss - imports:.0f} | "
                     f"{(rss - imports) / (base - imports):.2f}x |")
    lines += [
        "",
        f"### Act latency on CPU ({results['cpu_count']} cores; median of {results['runs']} acts, greedy, "
        f"max_new_tokens={results['max_new_tokens']})",
        "",
        "| model | base params | LoRA params (3 adapters) | route ms | generate ms | total ms "
        "| vision-tower calls / act |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in ("tiny", "100m"):
        r = lat[p]
        lines.append(f"| {p} | {_fmt_params(r['base_params'])} | {_fmt_params(r['lora_params_3_adapters'])} | "
                     f"{r['route_ms']:.1f} | {r['generate_ms']:.1f} | {r['total_ms']:.1f} | "
                     f"{r['vision_calls_per_act']:g} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    ap.add_argument("--runs", type=int, default=5, help="acts per model for the latency medians")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--workdir", help="keep the built models here (default: a temp folder, removed)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--registry", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.registry), args.max_new_tokens)))
        return

    # The parent never imports torch: it forks every measured process while small (see _rss_mib).
    t_start = time.time()
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="vlrouter-bench-")
        work = Path(tmp.name)
    regs = {}
    for preset in ("tiny", "100m"):
        reg = work / preset / "registry.yaml"
        regs[preset] = reg if reg.exists() else Path(run_child("build", work / preset, 0)["registry"])
    print(f"built models in {time.time() - t_start:.0f}s", file=sys.stderr)

    mem = {m: run_child(m, regs["100m"], args.max_new_tokens) for m in ("imports", "base", "engine", "seed")}
    os.environ["VLROUTER_BENCH_RUNS"] = str(args.runs)
    lat = {p: run_child("latency", regs[p], args.max_new_tokens) for p in ("tiny", "100m")}

    results = {"memory_100m": mem, "latency": lat, "max_new_tokens": args.max_new_tokens, "runs": args.runs,
               "cpu_count": os.cpu_count()}
    print(render(results))
    print(f"\n(bench took {time.time() - t_start:.0f}s)", file=sys.stderr)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
