#!/usr/bin/env python
"""Compose the README's benchmark blocks from the JSON results of one `bench/run`.

    python bench/report.py                  # print the blocks from bench/results/*.json
    python bench/report.py --update-readme  # also replace them in README.md (between their markers)

Two blocks: "Benchmarks" (train, engine, serve) and the scale table in "Scaling out"
(``scale.json``). ``tests/test_readme_bench.py`` renders the committed results the same
way and checks that README.md shows exactly those blocks, so tables and command cannot drift.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SCALE_START, SCALE_END = "<!-- scale:start -->", "<!-- scale:end -->"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def block(results_dir: Path = RESULTS) -> str:
    train = json.loads((results_dir / "train.json").read_text())
    engine = json.loads((results_dir / "engine.json").read_text())
    serve = json.loads((results_dir / "serve.json").read_text())
    return "\n".join([
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


def readme_block(readme: Path = README, start: str = START, end: str = END) -> str:
    m = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), readme.read_text(), re.S)
    if not m:
        raise SystemExit(f"{readme}: no {start} … {end} block")
    return m.group(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--update-readme", action="store_true", help="write the block into README.md")
    args = ap.parse_args()
    text, scale = block(), scale_block()
    print(text + "\n\n" + scale)
    if args.update_readme:
        new = README.read_text()
        for start, end, body in ((START, END, text), (SCALE_START, SCALE_END, scale)):
            m = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), new, re.S)
            if not m:
                raise SystemExit(f"{README}: no {start} … {end} block")
            new = new[:m.start()] + f"{start}\n{body}\n{end}" + new[m.end():]
        README.write_text(new)


if __name__ == "__main__":
    main()
