#!/usr/bin/env python
"""Training benchmark: cold retrain vs add-adapter retrain, head-training and embedding throughput.

    .venv/bin/python bench/bench_train.py [--json results.json] [--samples 24] [--models tiny,100m]

Builds (offline, in a temp folder unless ``--workdir``) random Qwen3-VL models with
:func:`vlrouter.core.tiny.build_tiny_model` -- ``tiny`` and the ~100M ``100m`` preset --
and synthetic per-task screenshot datasets (``tests/helpers.py``), then measures per model:

* **(a) cold retrain** over 3 adapters (empty feature cache) vs **add-adapter retrain**
  of a 4th (:func:`vlrouter.core.recipe.run_retrain` on the edited registry, as
  ``router add-adapter`` does): wall time, samples embedded, encoder forward calls.
  Both use ``workers=1`` so the comparison is about the cache, not the pool.
* **(b) head training** samples/s (:func:`vlrouter.core.fit.train_head` on the cached
  features, fixed step count, no early stop).
* **(c) embedding** samples/s of :func:`vlrouter.core.features.embed_dataset` on the
  3-adapter routing dataset with an empty cache, ``workers=1`` vs ``workers=2``
  (worker start-up included: that is what a user waits for).

A script, not a test: prints a markdown table; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLROUTER_NO_ENTRY_POINTS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.helpers

TASKS = ["calendar", "claim-window", "provider-select"]
NEW_TASK = "settings"


def _quiet() -> None:
    """The CLI's quieting (no transformers/hub chatter or bars) plus no warnings at all."""
    import warnings

    from vlrouter.cli.ui import quiet_libraries

    quiet_libraries()
    warnings.filterwarnings("ignore")


class ForwardCounter:
    """Counts encoder forward calls and the samples in them (wraps Encoder.embed_prepared)."""

    def __init__(self) -> None:
        from vlrouter.core.encoder import Encoder

        self.cls, self.real = Encoder, Encoder.embed_prepared
        self.calls = self.samples = 0
        counter = self

        def counted(enc, batch):
            counter.calls += 1
            counter.samples += int(batch["input_ids"].shape[0])
            return counter.real(enc, batch)

        Encoder.embed_prepared = counted

    def reset(self) -> tuple[int, int]:
        out = (self.calls, self.samples)
        self.calls = self.samples = 0
        return out

    def close(self) -> None:
        self.cls.embed_prepared = self.real


def bench_model(preset: str, workdir: Path, n: int, head_steps: int) -> dict:
    import torch

    from tests.helpers import make_dataset, make_registry, retrain
    from vlrouter.core.data import load_routing_dataset
    from vlrouter.core.encoder import Encoder
    from vlrouter.core.features import FeatureCache, embed_dataset
    from vlrouter.core.fit import train_head
    from vlrouter.core.options import resolve_options
    from vlrouter.core.registry import AdapterEntry, Registry
    from vlrouter.core.tiny import build_tiny_model

    model_dir = workdir / f"model-{preset}"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, preset)
    proj = workdir / f"proj-{preset}-{int(time.time())}"
    reg = Registry.load(make_registry(proj, model_dir, TASKS, n=n, workers=1))
    ds4 = make_dataset(proj / "data" / NEW_TASK, NEW_TASK, n)
    out: dict = {"preset": preset, "samples_per_adapter": n, "threads": torch.get_num_threads()}

    counter = ForwardCounter()
    try:
        # (a) cold retrain over 3 adapters, then the add-adapter retrain of a 4th
        t0 = time.perf_counter()
        cold = retrain(reg)
        out["cold_s"] = time.perf_counter() - t0
        out["cold_forward_calls"], out["cold_forward_samples"] = counter.reset()
        out["cold_embedded_new"], out["cold_val_acc"] = cold.embedded_new, cold.val_acc
        new = reg.add_adapter(AdapterEntry(name=NEW_TASK, dataset=str(ds4), checkpoint=str(proj / "ck")))
        t0 = time.perf_counter()
        add = retrain(new)
        out["add_s"] = time.perf_counter() - t0
        out["add_forward_calls"], out["add_forward_samples"] = counter.reset()
        out["add_embedded_new"], out["add_reused_cached"], out["add_val_acc"] = (add.embedded_new, add.reused_cached,
                                                                                  add.val_acc)
    finally:
        counter.close()

    # (b) head training throughput on the cached features of the 4-adapter dataset
    opts = resolve_options(new, {})
    ds = load_routing_dataset(add.dataset_dir)
    train, val = ds.split("train"), ds.split("val")
    enc = Encoder.load(str(model_dir), device="cpu")
    views, _ = embed_dataset(enc, train + val, FeatureCache(proj / ".features", enc.fingerprint()), layers=[-1])
    feats = views[f"mean@{enc.num_layers}"]
    tx, vx = feats[:len(train)], feats[len(train):]
    ty, vy = [s.label for s in train], [s.label for s in val]
    steps_per_epoch = -(-len(train) // opts.batch_size)
    hopts = opts.model_copy(update={"epochs": max(1, head_steps // steps_per_epoch), "patience": 10_000,
                                    "eval_every": 10_000, "solver": "adamw"})  # minibatch steps per second
    _, hstats = train_head(tx, ty, vx, vy, hopts, num_labels=len(ds.class_names))
    out["hidden_size"] = enc.hidden_size
    out["head_steps"], out["head_batch"] = hstats["steps"], opts.batch_size
    out["head_samples_per_s"] = hstats["steps"] * opts.batch_size / hstats["seconds"]

    # (c) embedding throughput, empty cache, 1 vs 2 worker processes (after one warm-up forward)
    three = [s for s in train + val if s.adapter in TASKS]
    from vlrouter.core.images import open_image

    enc.embed([open_image(three[0].image)], [three[0].prompt], [-1])
    for workers in (1, 2):
        cache = FeatureCache(proj / f".bench-cache-w{workers}", enc.fingerprint())
        t0 = time.perf_counter()
        _, st = embed_dataset(enc, three, cache, layers=[-1], workers=workers, batch_size=opts.embed_batch_size)
        dt = time.perf_counter() - t0
        out[f"embed_w{workers}_samples"] = st["embedded_new"]
        out[f"embed_w{workers}_s"] = dt
        out[f"embed_w{workers}_samples_per_s"] = st["embedded_new"] / dt
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| model | cold retrain, 3 adapters | add-adapter retrain (4th) | head training | embed, 1 worker | "
        "embed, 2 workers |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} (H={r['hidden_size']}, {r['samples_per_adapter']}/adapter) "
            f"| {r['cold_s']:.1f} s; {r['cold_forward_samples']} samples in {r['cold_forward_calls']} forwards; "
            f"val acc {r['cold_val_acc']:.2f} "
            f"| {r['add_s']:.1f} s; {r['add_forward_samples']} samples in {r['add_forward_calls']} forwards "
            f"({r['add_reused_cached']} reused); val acc {r['add_val_acc']:.2f} "
            f"| {r['head_samples_per_s']:,.0f} samples/s ({r['head_steps']} steps × {r['head_batch']}) "
            f"| {r['embed_w1_samples_per_s']:.1f} samples/s ({r['embed_w1_samples']} in {r['embed_w1_s']:.1f} s) "
            f"| {r['embed_w2_samples_per_s']:.1f} samples/s ({r['embed_w2_samples']} in {r['embed_w2_s']:.1f} s) |")
    return "\n".join(lines)


def render(results: dict) -> str:
    """The markdown table of one run's results (what bench/run prints and the README shows)."""
    return (table(results["rows"]) + f"\n\n{results['cpus']} CPUs, torch {results['torch']}, "
            f"Python {results.get('python', '?')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--samples", type=int, default=24, help="samples per adapter (default 24)")
    ap.add_argument("--models", default="tiny,100m", help="comma-separated presets (default tiny,100m)")
    ap.add_argument("--head-steps", type=int, default=400, help="optimizer steps for the head benchmark")
    ap.add_argument("--workdir", type=Path, help="keep models/projects here (default: a temp folder)")
    args = ap.parse_args()
    _quiet()
    import platform

    import torch

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vlrouter-bench-train-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [bench_model(p.strip(), workdir, args.samples, args.head_steps) for p in args.models.split(",") if p.strip()]
    results = {"rows": rows, "cpus": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version()}
    print(render(results))
    print(f"workdir {workdir}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
