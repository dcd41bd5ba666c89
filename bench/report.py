#!/usr/bin/env python
"""Compose the README's benchmark block from the JSON results of one `bench/run`.

    python bench/report.py                  # print the block from bench/results/*.json
    python bench/report.py --update-readme  # also replace it in README.md (between the bench markers)

``tests/test_readme_bench.py`` renders the committed results the same way and checks
that README.md shows exactly that block, so the table and the command cannot drift.
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


def readme_block(readme: Path = README) -> str:
    m = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), readme.read_text(), re.S)
    if not m:
        raise SystemExit(f"{readme}: no {START} … {END} block")
    return m.group(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--update-readme", action="store_true", help="write the block into README.md")
    args = ap.parse_args()
    text = block()
    print(text)
    if args.update_readme:
        old = README.read_text()
        new = old.replace(f"{START}\n{readme_block()}\n{END}", f"{START}\n{text}\n{END}")
        README.write_text(new)


if __name__ == "__main__":
    main()
