#!/usr/bin/env python
"""Scale benchmark: 4, 16, 64 and 256 adapters -- engine load, memory all resident vs max_loaded_adapters, latency,
add-adapter retrain, routing accuracy.

    .venv/bin/python bench/bench_scale.py [--json results.json] [--counts 4,16,64,256] [--models tiny,100m]
                                          [--samples 8] [--cap 4] [--workdir DIR]

Builds (offline, in a temp folder unless ``--workdir``) a random Qwen3-VL per preset
(:func:`vlrouter.core.tiny.build_tiny_model`: ``tiny`` and the ~100M ``100m``), LoRA
adapters made with peft (r=8 on every language-model projection, non-zero B; one
PeftModel whose weights are re-drawn and saved per adapter), and a synthetic dataset per
adapter (``--samples`` screenshots, its own colours, layout and wording). Then per adapter
count N:

* **routing accuracy**: a router trained over the N adapters (``run_retrain``, the local
  backend; the feature cache is shared between the counts), its validation accuracy;
* **add-adapter retrain**: the retrain after adding one more adapter with ``--samples``
  samples (what ``router add-adapter`` runs): wall time, and within it the embedding and
  head-fitting seconds; plus, at the count nearest 16, the same with 1x, 2x and 4x the
  samples, to show what the time grows with;
* **engine**, in fresh processes (peak RSS as :mod:`bench_engine` measures it): load
  time, route and act latency (median of 5, greedy, 8 new tokens, a resident adapter),
  and peak RSS while acts cycle through all N adapters (4 new tokens each), once with
  every adapter resident and once with ``engine.max_loaded_adapters: --cap`` -- where
  each cycle act loads its adapter (the "miss" latency); the texts of both runs are
  compared act by act.

A script, not a test: prints a markdown table; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import colorsys
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLROUTER_NO_ENTRY_POINTS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_ADAPTERS = 256
EXTRA = ["new-4", "new-16", "new-64", "new-256", "grow-1x", "grow-2x", "grow-4x"]  # added by add-adapter runs
_A = ["red", "blue", "green", "amber", "violet", "silver", "golden", "coral", "ivory", "olive", "teal", "navy",
      "plum", "rust", "jade", "pearl"]
_B = ["invoice", "calendar", "claim", "provider", "settings", "search", "report", "upload", "payment", "profile",
      "ticket", "order", "message", "schedule", "account", "inventory"]
_C = ["", "backup ", "archived "]
PROMPT = "Click the first item"  # the engine's latency and cycle acts


def _bench_engine():
    """bench/bench_engine.py as a module: its RSS helpers and quieting, not copies of them."""
    spec = importlib.util.spec_from_file_location("bench_engine", HERE / "bench_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BE = _bench_engine()


def adapter_names() -> list[str]:
    return [f"t{i:03d}" for i in range(MAX_ADAPTERS)] + EXTRA


def _task(i: int) -> tuple[tuple[int, int, int], str, int]:
    """Colour, wording and layout of adapter ``i``: different for every adapter."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.6180339) % 1.0, 0.35 + 0.6 * ((i * 7) % 11) / 10, 0.45 + 0.5 * (i % 3) / 2)
    words = f"{_C[i // 256]}{_A[i % 16]} {_B[(i // 16) % 16]}"
    return (int(r * 255), int(g * 255), int(b * 255)), words, i % 5


def write_dataset(root: Path, i: int, name: str, n: int) -> Path:
    """``n`` samples of adapter ``i`` in the seed's JSONL format under ``root/name``."""
    from PIL import Image, ImageDraw

    color, words, layout = _task(i)
    d = root / name
    (d / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{name}:{n}")
    lines = []
    for k in range(n):
        img = Image.new("RGB", (128, 96), color)
        draw = ImageDraw.Draw(img)
        for j in range(1 + layout):
            x, y = rng.randrange(4, 96), rng.randrange(4, 70)
            shape = draw.ellipse if (i + j) % 2 else draw.rectangle
            shape([x, y, x + 24, y + 18], fill=tuple(255 - c for c in color))
        sid = f"{name}-{k:04d}"
        img.save(d / "images" / f"{sid}.png")
        prompt = f"In the {words} panel, press item {rng.randrange(1, 40)}"
        lines.append(json.dumps({"id": sid, "image": f"images/{sid}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"},
            {"from": "gpt", "value": f"click(x={rng.randrange(128)}, y={rng.randrange(96)})"}]}))
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    return d / "train.jsonl"


def registry_text(root: Path, model_dir: Path, names: list[str], *, cap: int | None = None,
                  router_dir: str = "runs/router", datasets_dir: str = "datasets") -> str:
    lines = [f"base_model: {model_dir}", "router:", f"  dir: {router_dir}", "  pooling: mean", "  layer: -1",
             "train:", "  epochs: 60", "  batch_size: 16", "  lr: 0.01", "  patience: 8", "  eval_every: 5",
             "  workers: 1", "  embed_batch_size: 16", "  seed: 0", f"  datasets_dir: {datasets_dir}",
             f"  cache_dir: {root / 'features'}"]
    if cap is not None:
        lines += ["engine:", f"  max_loaded_adapters: {cap}"]
    lines.append("adapters:")
    for n in names:
        lines += [f"  - name: {n}", f"    dataset: {root / 'data' / n / 'train.jsonl'}",
                  f"    checkpoint: {root / 'checkpoints' / n}"]
    return "\n".join(lines) + "\n"


# ---- children (fresh processes) ----------------------------------------------------------------

def child_build(root: Path, preset: str, samples: int) -> dict:
    """Model, every adapter's LoRA (peft) and dataset."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlrouter.core.tiny import build_tiny_model

    t0 = time.perf_counter()
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, preset)
    base = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=BE.LORA_TARGETS, init_lora_weights=False)
    pm = get_peft_model(base, cfg)
    lora = [p for n, p in pm.named_parameters() if "lora_" in n]
    lora_params = sum(p.numel() for p in lora)
    for i, name in enumerate(adapter_names()):
        out = root / "checkpoints" / name
        if not (out / "adapter_model.safetensors").exists():
            g = torch.Generator().manual_seed(1000 + i)
            with torch.no_grad():
                for p in lora:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            pm.save_pretrained(str(out))
        n = samples * {"grow-2x": 2, "grow-4x": 4}.get(name, 1)
        if not (root / "data" / name / "train.jsonl").exists():
            write_dataset(root / "data", i, name, n)
    return {"model_dir": str(model_dir), "lora_params_per_adapter": lora_params,
            "lora_mb_per_adapter": (root / "checkpoints" / "t000" / "adapter_model.safetensors").stat().st_size / 1e6,
            "build_s": time.perf_counter() - t0}


def _retrain(path: Path) -> tuple[object, float]:
    from tests.helpers import retrain

    t0 = time.perf_counter()
    result = retrain(path)
    return result, time.perf_counter() - t0


def child_train(root: Path, counts: list[int]) -> dict:
    """Per count: the router over N adapters (its val acc), and the add-adapter retrain of one more."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    names = adapter_names()
    model_dir = root / "model"
    out: dict = {"counts": {}, "grow": []}
    for n in counts:
        proj = root / f"n{n}"
        proj.mkdir(exist_ok=True)
        reg = proj / "registry.yaml"
        reg.write_text(registry_text(root, model_dir, names[:n]))
        cold, cold_s = _retrain(reg)
        add = proj / "add.yaml"
        add.write_text(registry_text(root, model_dir, [*names[:n], f"new-{n}"], router_dir="runs/router-add",
                                     datasets_dir="datasets-add"))
        res, add_s = _retrain(add)
        out["counts"][n] = {"val_acc": cold.val_acc, "cold_s": cold_s, "add_s": add_s,
                            "add_embed_s": res.stats["embed"]["seconds"], "add_fit_s": res.stats["train"]["seconds"],
                            "add_embedded_new": res.embedded_new, "add_reused_cached": res.reused_cached,
                            "add_val_acc": res.val_acc}
    n = min(counts, key=lambda c: abs(c - 16))
    for k, grow in ((1, "grow-1x"), (2, "grow-2x"), (4, "grow-4x")):
        reg = root / f"n{n}" / f"{grow}.yaml"
        reg.write_text(registry_text(root, model_dir, [*names[:n], grow], router_dir=f"runs/router-{grow}",
                                     datasets_dir=f"datasets-{grow}"))
        res, s = _retrain(reg)
        out["grow"].append({"adapters": n, "factor": k, "new_samples": res.embedded_new, "add_s": s,
                            "add_embed_s": res.stats["embed"]["seconds"], "add_fit_s": res.stats["train"]["seconds"]})
    return out


def child_engine(registry: Path, cap: int | None) -> dict:
    """Load, latency, and peak RSS while acts cycle through every adapter; the cycle's texts."""
    import torch

    from vlrouter.core.engine import Engine

    BE._quiet()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    engine = Engine.from_registry(registry, device="cpu")
    load_s = time.perf_counter() - t0
    image = BE._screen(0)
    engine.act(image, PROMPT, max_new_tokens=8)  # warm-up
    routes, acts = [], []
    for _ in range(5):
        t = time.perf_counter()
        engine.route(image, PROMPT)
        routes.append((time.perf_counter() - t) * 1e3)
        resident = engine.pool.resident[-1]
        acts.append(engine.act(image, PROMPT, max_new_tokens=8, adapter=resident).timings["total_ms"])
    texts, cycle_ms = [], []
    for name in engine.adapters:
        a = engine.act(image, PROMPT, max_new_tokens=4, adapter=name)
        texts.append(a.text)
        cycle_ms.append(a.timings["total_ms"])
    pool = engine.pool
    return {"load_s": load_s, "route_ms": statistics.median(routes), "act_ms": statistics.median(acts),
            "cycle_act_ms": statistics.median(cycle_ms), "texts": texts, "loads": pool.loads,
            "peak_resident": pool.peak, "resident_now": len(engine.model.peft_config),
            "peak_rss_mib": BE._rss_mib(), "vm_hwm_mib": BE._hwm_mib()}


def run_child(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the table -------------------------------------------------------------------------------

def render(results: dict) -> str:
    """The markdown table of one run (what bench/run prints and README's "Scaling out" shows)."""
    cap = results["cap"]
    lines = [
        f"| model | adapters | engine load | peak RSS, all resident | peak RSS, max_loaded_adapters: {cap} "
        f"| route ms | act ms | act ms, adapter loaded on demand | add-adapter retrain (embed + fit) "
        "| routing val acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for p in results["presets"]:
        for n, r in sorted(p["counts"].items(), key=lambda kv: int(kv[0])):
            full, capped = r["engine_all"], r["engine_cap"]
            same = "" if r["texts_equal"] else " (texts differ!)"
            lines.append(
                f"| {p['preset']} | {n} | {full['load_s']:.1f} s / {capped['load_s']:.1f} s "
                f"| {full['peak_rss_mib']:.0f} MiB | {capped['peak_rss_mib']:.0f} MiB "
                f"({capped['peak_rss_mib'] / p['rss_base_mib']:.2f}x the {cap}-adapter engine){same} "
                f"| {full['route_ms']:.0f} | {full['act_ms']:.0f} | {capped['cycle_act_ms']:.0f} "
                f"| {r['add_s']:.1f} s ({r['add_embed_s']:.1f} + {r['add_fit_s']:.1f}; {r['add_embedded_new']} new, "
                f"{r['add_reused_cached']} cached) | {r['val_acc']:.2f} |")
    lines += ["", "| model | adapters | new adapter's samples | add-adapter retrain | embed | fit |",
              "|---|---:|---:|---:|---:|---:|"]
    for p in results["presets"]:
        for g in p["grow"]:
            lines.append(f"| {p['preset']} | {g['adapters']} | {g['new_samples']} | {g['add_s']:.1f} s "
                         f"| {g['add_embed_s']:.1f} s | {g['add_fit_s']:.1f} s |")
    sizes = ", ".join(f"{p['preset']} {p['lora_mb_per_adapter']:.1f} MB" for p in results["presets"])
    lines += ["", f"{results['cpus']} CPUs, torch {results['torch']}, Python {results['python']}; LoRA r=8 on every "
              f"language-model projection ({sizes} per adapter); {results['samples']} samples per adapter; engine "
              f"load: all resident / capped; load average {results.get('load_average', '?')} at the end (a shared "
              "machine: latencies are noisy)"]
    return "\n".join(lines)


def _span(values: list[float], fmt: str = "{:.0f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def growth(results: dict) -> str:
    """One sentence per figure: how it grows with the adapter count N, read off the results."""
    cap, out = results["cap"], []
    for p in results["presets"]:
        rows = [(int(n), r) for n, r in sorted(p["counts"].items(), key=lambda kv: int(kv[0]))]
        (n0, r0), (n1, r1) = rows[0], rows[-1]
        name = p["preset"]
        per = (r1["engine_all"]["peak_rss_mib"] - r0["engine_all"]["peak_rss_mib"]) / (n1 - n0)
        ratios = [r["engine_cap"]["peak_rss_mib"] / p["rss_base_mib"] for _, r in rows]
        same = "every text equal to the all-resident engine's" if all(r["texts_equal"] for _, r in rows) \
            else "TEXTS DIFFER"
        embeds = " → ".join(f"{g['add_embed_s']:.1f}" for g in p["grow"])
        accs = " → ".join(f"{r['val_acc']:.2f}" for _, r in rows)
        out.append(
            f"- **{name}, memory**: all resident, peak RSS grows linearly with N (~{per:.1f} MiB per adapter, "
            f"{r0['engine_all']['peak_rss_mib']:.0f} → {r1['engine_all']['peak_rss_mib']:.0f} MiB from {n0} to {n1} "
            f"adapters); with `max_loaded_adapters: {cap}` it does not grow: {_span(ratios, '{:.2f}')}x the "
            f"{cap}-adapter engine at every N, while acts cycle through all N adapters "
            f"({same}).")
        def trend(key: str, part: str, unit: str, fmt: str = "{:.0f}", rows=rows) -> str:
            """"stays a–b" when the largest N costs under 1.5x the smallest, else "grows x → y (kx)"."""
            vals = [r[part][key] for _, r in rows]
            if vals[-1] <= 1.5 * vals[0]:
                return f"stays {_span(vals, fmt)} {unit}"
            return f"grows {fmt.format(vals[0])} → {fmt.format(vals[-1])} {unit} ({vals[-1] / vals[0]:.1f}x)"

        out.append(
            f"- **{name}, engine load**: all resident it {trend('load_s', 'engine_all', 's', '{:.1f}')} from {n0} to "
            f"{n1} adapters (every adapter loaded at start, and each load walks the adapters already loaded: "
            f"peft's set_adapter); "
            f"capped it {trend('load_s', 'engine_cap', 's', '{:.1f}')} ({cap} loaded, the rest only checked).")
        out.append(
            f"- **{name}, latency** ({n1 // n0}x the adapters): routing all resident "
            f"{trend('route_ms', 'engine_all', 'ms')}, capped {trend('route_ms', 'engine_cap', 'ms')}; an act on a "
            f"resident adapter all resident {trend('act_ms', 'engine_all', 'ms')}, capped "
            f"{trend('act_ms', 'engine_cap', 'ms')}; an act whose adapter "
            f"must be loaded first costs one adapter load more "
            f"({_span([r['engine_cap']['cycle_act_ms'] for _, r in rows])} ms for 4 tokens).")
        grow = p["grow"]
        per_cached = [(r["add_s"] - r0["add_s"]) / max(r["add_reused_cached"] - r0["add_reused_cached"], 1) * 1000
                      for _, r in rows[1:]]
        out.append(
            f"- **{name}, add-adapter retrain**: it embeds only the new adapter's samples "
            f"({r0['add_embedded_new']} at every N; {r0['add_reused_cached']} → {r1['add_reused_cached']} reused from "
            f"the cache), and embedding grows with those samples ({embeds} s for "
            f"{' → '.join(str(g['new_samples']) for g in grow)} new samples at {grow[0]['adapters']} adapters): on a "
            f"real Qwen3-VL that is the cost that matters (a GPU forward per sample). What grows with N is the "
            f"bookkeeping over the samples already there: reading their cached features and fitting the head over "
            f"all of them ({r0['add_fit_s']:.1f} → {r1['add_fit_s']:.1f} s fit; the whole retrain {r0['add_s']:.1f} → "
            f"{r1['add_s']:.1f} s, about {_span(per_cached, '{:.1f}')} ms per cached sample).")
        out.append(
            f"- **{name}, routing accuracy**: {accs} for "
            f"{' → '.join(str(n) for n, _ in rows)} adapters on random-weight features ({results['samples']} "
            f"samples per adapter, one softmax over all N).")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    ap.add_argument("--counts", default="4,16,64,256")
    ap.add_argument("--models", default="tiny,100m")
    ap.add_argument("--samples", type=int, default=8, help="samples per adapter")
    ap.add_argument("--cap", type=int, default=4, help="engine.max_loaded_adapters of the capped engine")
    ap.add_argument("--workdir", help="keep models, LoRAs and projects here (default: a temp folder, removed)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, *rest = args.child
        if mode == "build":
            out = child_build(Path(rest[0]), rest[1], int(rest[2]))
        elif mode == "train":
            out = child_train(Path(rest[0]), [int(c) for c in rest[1].split(",")])
        else:
            out = child_engine(Path(rest[0]), int(rest[1]) if rest[1] != "none" else None)
        print(json.dumps(out))
        return

    # The parent never imports torch: it starts every measured process while small (see bench_engine._rss_mib).
    t_start = time.time()
    counts = [int(c) for c in args.counts.split(",")]
    if max(counts) > MAX_ADAPTERS or args.cap not in counts:
        raise SystemExit(f"--counts: at most {MAX_ADAPTERS} adapters, and --cap ({args.cap}) among them (the baseline)")
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="vlrouter-bench-scale-")
    work = Path(args.workdir or tmp.name)
    presets = []
    for preset in [m.strip() for m in args.models.split(",") if m.strip()]:
        root = work / preset
        root.mkdir(parents=True, exist_ok=True)
        built = run_child("build", str(root), preset, str(args.samples))
        print(f"{preset}: built in {built['build_s']:.0f}s", file=sys.stderr)
        trained = run_child("train", str(root), ",".join(map(str, counts)))
        print(f"{preset}: trained at {time.time() - t_start:.0f}s", file=sys.stderr)
        rows = {}
        for n in counts:
            reg = root / f"n{n}" / "registry.yaml"
            capped = root / f"n{n}" / "capped.yaml"
            capped.write_text(reg.read_text().replace("adapters:\n", f"engine:\n  max_loaded_adapters: {args.cap}\n"
                                                      "adapters:\n", 1))
            full = run_child("engine", str(reg), "none")
            cap = run_child("engine", str(capped), str(args.cap))
            rows[n] = {**trained["counts"][str(n)], "engine_all": full, "engine_cap": cap,
                       "texts_equal": full.pop("texts") == cap.pop("texts")}
            print(f"{preset}: {n} adapters done at {time.time() - t_start:.0f}s", file=sys.stderr)
        # the baseline of the memory contract: the engine over `cap` adapters, all resident
        rss_base = rows[args.cap]["engine_all"]["peak_rss_mib"]
        presets.append({"preset": preset, "counts": rows, "grow": trained["grow"], "rss_base_mib": rss_base,
                        "lora_params_per_adapter": built["lora_params_per_adapter"],
                        "lora_mb_per_adapter": built["lora_mb_per_adapter"]})
    import importlib.metadata

    results = {"presets": presets, "cap": args.cap, "samples": args.samples, "cpus": os.cpu_count(),
               "load_average": round(os.getloadavg()[0], 1),
               "torch": importlib.metadata.version("torch"), "python": platform.python_version()}
    print(render(results))
    print(f"\n(bench took {time.time() - t_start:.0f}s)", file=sys.stderr)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
