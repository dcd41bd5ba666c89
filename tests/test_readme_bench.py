"""The README's benchmark tables are exactly what `bench/run` prints for the committed results."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_benchmark_block_matches_bench_run_output():
    report = _report()
    assert report.readme_block() == report.block(), "README benchmarks differ: run `bash bench/run --update-readme`"


def test_readme_gpu_block_matches_the_gpu_results():
    """The "Real-size figures on a GPU" tables render bench/results/gpu-*.json, or say that no GPU run happened."""
    report = _report()
    block = report.readme_block(start=report.GPU_START, end=report.GPU_END)
    assert block == report.gpu_block(), "README GPU figures differ: run `python bench/report.py --update-readme`"
    if not report.gpu_results():
        assert "No GPU run has happened yet" in block and report.GPU_COMMAND in block


def test_readme_names_the_gpu_benchmark_command():
    readme = (ROOT / "README.md").read_text()
    run = (ROOT / "bench" / "gpu" / "run").read_text()
    assert "## Real-size figures on a GPU" in readme and "bash bench/gpu/run" in readme
    assert "bench/gpu/bench_gpu.py" in run


def test_readme_scale_table_matches_the_committed_scale_results():
    report = _report()
    assert report.readme_block(start=report.SCALE_START, end=report.SCALE_END) == report.scale_block(), \
        "README's scale table differs: run `bash bench/run --update-readme` (or bench/report.py --update-readme)"


def test_readme_names_the_one_benchmark_command():
    readme = (ROOT / "README.md").read_text()
    run = (ROOT / "bench" / "run").read_text()
    assert "bash bench/run" in readme and "make bench" in readme
    assert "bench/bench_train.py" in run and "bench/bench_engine.py" in run and "bench/report.py" in run
    assert "bench/bench_serve.py" in run and "bench/bench_quality.py" in run and "bench/bench_scale.py" in run
