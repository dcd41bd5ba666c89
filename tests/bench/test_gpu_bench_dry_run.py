"""The GPU benchmark script cannot rot: its CPU dry run (100m preset) and its embedded real-size configs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu" / "bench_gpu.py"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # its dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench_gpu():
    return _load("bench_gpu", SCRIPT)


@pytest.fixture(scope="module")
def report():
    return _load("bench_report", ROOT / "bench" / "report.py")


@pytest.mark.slow
def test_dry_run_writes_every_figure_with_sane_values(tmp_path, bench_gpu, report):
    before = sorted(p.name for p in (ROOT / "bench" / "results").glob("gpu-*.json"))
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "run"), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(p.name for p in (ROOT / "bench" / "results").glob("gpu-*.json")) == before  # never written there
    r = json.loads((tmp_path / "gpu-100m.json").read_text())

    assert r["size"] == "100m" and r["dry_run"] is True and r["device"] == "cpu (dry run)"
    assert r["dtype"] == "float32" and r["device_type"] == "cpu"
    assert all(r["versions"][k] for k in ("torch", "transformers", "peft", "python", "vlrouter"))
    datetime.fromisoformat(r["date"])
    assert r["command"].startswith("bash bench/gpu/run --dry-run")

    c = r["config"]
    assert c["screenshot"] == [1280, 720] and c["adapters"] == bench_gpu.ADAPTERS
    assert c["plan"] == json.loads(json.dumps(dataclasses.asdict(bench_gpu.DRY)))
    assert 0 < c["image_tokens"] < c["prompt_tokens"]
    assert c["text_layers"] == 12 and c["hidden_size"] == 768

    p = r["params"]
    assert 90e6 < p["base"] < 115e6 and 0 < p["vision"] < p["base"] and 0 < p["lora_4_adapters"] < p["base"] / 10
    assert p["base_weights_mib"] == pytest.approx(p["base"] * 4 / 2**20, rel=0.01) and p["lora_mib"] > 0

    m = r["memory"]
    assert m["kind"].startswith("cpu peak RSS")
    peaks = {k: m[k]["peak_mib"] for k in ("base", "engine", "seed")}
    if None not in peaks.values():  # /proc/self/clear_refs writable: peak RSS per phase
        assert all(m[k]["resident_mib"] <= peaks[k] + 1 for k in peaks)
        assert peaks["engine"] > 0.9 * peaks["base"]
        # the seed's second base copy: about one more set of weights than the engine
        assert peaks["seed"] - peaks["engine"] > 0.5 * p["base_weights_mib"]

    lat = r["latency"]
    assert 0 < lat["route_ms"] < lat["total_ms"] and 0 < lat["generate_ms"] < lat["total_ms"]
    assert 0 < lat["preprocess_ms"] < lat["route_ms"] and lat["vision_calls_per_act"] == 1
    rl = r["route_layers"]
    assert rl["last"]["layer"] == 12 and rl["early"]["layer"] == 6
    assert rl["last"]["route_ms"] > 0 and rl["early"]["route_ms"] > 0

    assert [b["batch"] for b in r["act_batch"]] == list(bench_gpu.DRY.batches)
    for b in r["act_batch"]:
        # rounded to 2 decimals: on a loaded CPU a slow act (0.07/s) is off by more than 1 % from rounding alone
        assert b["samples_per_s"] == pytest.approx(b["batch"] / (b["total_ms"] / 1e3), rel=0.01, abs=0.006)
        assert 1 <= b["adapters_in_batch"] <= min(b["batch"], 4) and b["vision_calls"] == 1

    e = r["embed"]
    assert e["samples"] == e["embedded_new"] == bench_gpu.DRY.embed_samples and e["features_finite"]
    assert e["samples_per_s"] > 0 and e["forward_only_samples_per_s"] > 0 and e["batch_size"] >= 1

    # The README renderer takes it; the README block ignores dry runs.
    table = bench_gpu.render([r])
    assert "1280x720" in table and "cpu (dry run)" in table and "act_batch 2" in table
    assert report.gpu_block(tmp_path) == report.gpu_block(tmp_path / "none")  # "no GPU run yet"
    real = tmp_path / "as-if-gpu"
    real.mkdir()
    (real / "gpu-100m.json").write_text(json.dumps({**r, "dry_run": False, "device": "FAKE-GPU"}))
    assert "FAKE-GPU" in report.gpu_block(real) and "act_batch 1" in report.gpu_block(real)


def test_published_configs_build_the_published_models(tmp_path, bench_gpu):
    """The embedded config.json dicts give the checkpoints' sizes (8B: its safetensors index's total_size / 2),
    and the published image-processor settings keep a 1280x720 screenshot at full size."""
    import torch
    from PIL import Image
    from transformers import Qwen3VLForConditionalGeneration

    from vlrouter.core.encoder import build_inputs

    counts = {}
    for size in ("2b", "8b"):
        cfg, processor, label, _folder = bench_gpu.model_parts(size, tmp_path / size)
        with torch.device("meta"):
            model = Qwen3VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
        counts[size] = sum(p.numel() for p in model.parameters())
        assert label == f"Qwen3-VL-{size.upper()}-Instruct architecture"
        assert cfg.text_config.vocab_size == 151936 and len(processor.tokenizer) < 300
        assert cfg.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert cfg.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
        batch = build_inputs(processor, [Image.new("RGB", bench_gpu.SCREEN)], ["Click the blue button"])
        assert batch["image_grid_thw"][0].tolist() == [1, 44, 80]  # 1280x704: 3520 patches, 880 image tokens
    assert counts["8b"] * 2 == 17_534_247_392
    assert counts["2b"] == 2_127_532_032  # tied embeddings


def test_refuses_without_cuda_and_keeps_dry_runs_out_of_results(bench_gpu):
    with pytest.raises(SystemExit, match="bench/results"):
        bench_gpu.main(["--dry-run", "--out", str(ROOT / "bench" / "results")])
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            bench_gpu.main(["--sizes", "2b", "--out", "/nonexistent-never-created"])
