#!/usr/bin/env python
"""Compose the README's benchmark blocks from the JSON results of `bench/run` and `bench/gpu/run`.

    python bench/report.py                  # print every block from bench/results/*.json
    python bench/report.py --update-readme  # also replace them in README.md (between their markers)

Three blocks: the CPU benchmarks (``quality.json``, ``train.json``, ``engine.json``, ``serve.json``),
the scale table in "Scaling out" (``scale.json``) and the real-size GPU figures (``gpu-<size>.json``;
until a GPU run has happened, a line that says so and gives the command).
``tests/test_readme_bench.py`` renders the committed results the same way and checks that
README.md shows exactly those blocks, so tables and commands cannot drift.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
GPU_START, GPU_END = "<!-- bench-gpu:start -->", "<!-- bench-gpu:end -->"
GPU_COMMAND = "bash bench/gpu/run"
SCALE_START, SCALE_END = "<!-- scale:start -->", "<!-- scale:end -->"


def _module(name: str, path: Path | None = None):
    spec = importlib.util.spec_from_file_location(name, path or HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses (bench_gpu.Plan) look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def block(results_dir: Path = RESULTS) -> str:
    train = json.loads((results_dir / "train.json").read_text())
    engine = json.loads((results_dir / "engine.json").read_text())
    serve = json.loads((results_dir / "serve.json").read_text())
    quality = json.loads((results_dir / "quality.json").read_text())
    return "\n".join([
        "### Routing quality: the seed's head vs the default, every candidate, OOD, early exit "
        "(bench/bench_quality.py)",
        "",
        _module("bench_quality").render(quality),
        "",
        "### Training: cold retrain vs add-adapter, head training, embedding (bench/bench_train.py)",
        "",
        _module("bench_train").render(train),
        "",
        "### Engine: memory and act latency (bench/bench_engine.py)",
        "",
        _module("bench_engine").render(engine),
        "",
        "### Serving: throughput and latency, batched vs unbatched (bench/bench_serve.py)",
        "",
        _module("bench_serve").render(serve),
    ])


def gpu_results(results_dir: Path = RESULTS) -> list[dict]:
    """The GPU runs' results (``gpu-<size>.json``); dry runs never count."""
    found = [json.loads(p.read_text()) for p in sorted(results_dir.glob("gpu-*.json"))]
    return [r for r in found if not r.get("dry_run")]


def gpu_block(results_dir: Path = RESULTS) -> str:
    results = gpu_results(results_dir)
    if not results:
        return (f"No GPU run has happened yet: every figure above comes from a 2-core CPU. On a machine with a CUDA "
                f"GPU (H100/H200 class, no network needed), `{GPU_COMMAND}` measures the Qwen3-VL-2B and -8B "
                "architectures (budget: 8 minutes), writes `bench/results/gpu-2b.json` and `gpu-8b.json`, and "
                "puts their tables here.")
    return _module("bench_gpu", HERE / "gpu" / "bench_gpu.py").render(results)


def scale_block(results_dir: Path = RESULTS) -> str:
    """The scale table (bench/bench_scale.py) and how each figure grows with the adapter count."""
    scale = json.loads((results_dir / "scale.json").read_text())
    mod = _module("bench_scale")
    return "\n".join([
        "    .venv/bin/python bench/bench_scale.py --json bench/results/scale.json   # (part of `bash bench/run`)",
        "",
        mod.render(scale),
        "",
        mod.growth(scale),
    ])


def _find(text: str, start: str, end: str, where: Path) -> re.Match:
    m = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), text, re.S)
    if not m:
        raise SystemExit(f"{where}: no {start} … {end} block")
    return m


def readme_block(readme: Path = README, start: str = START, end: str = END) -> str:
    return _find(readme.read_text(), start, end, readme).group(1)


def update_readme(readme: Path = README) -> None:
    """Replace every block in README.md with what the committed results render."""
    text = readme.read_text()
    for start, end, new in ((START, END, block()), (SCALE_START, SCALE_END, scale_block()),
                            (GPU_START, GPU_END, gpu_block())):
        m = _find(text, start, end, readme)
        text = text[:m.start(1)] + new + text[m.end(1):]
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--update-readme", action="store_true", help="write both blocks into README.md")
    args = ap.parse_args()
    print(block())
    print()
    print(scale_block())
    print()
    print(gpu_block())
    if args.update_readme:
        update_readme()


if __name__ == "__main__":
    main()
