"""The offline demo end to end, small: every step runs and reports what the README promises."""

from __future__ import annotations

import json

from vlrouter.core.progress import RecordingProgress
from vlrouter.core.registry import Registry
from vlrouter.core.store import read_meta
from vlrouter.demo.pipeline import EXTRA_TASK, SEED_TASKS, DemoConfig, run_demo


def test_demo_runs_every_step_and_add_adapter_embeds_only_the_new_task(tmp_path, tiny_model_dir):
    # epochs: enough for the router to beat chance, which the gate requires before promoting (head training is ms)
    cfg = DemoConfig(samples_per_task=10, heldout_per_task=1, lora_steps=2, epochs=100,
                     base_model=str(tiny_model_dir))
    steps = []
    report = run_demo(tmp_path / "demo", cfg, progress=RecordingProgress(), on_step=lambda n, r: steps.append(n))

    assert steps == ["datasets", "loras", "retrain", "add-adapter", "eval", "act"]
    assert [r.adapter for r in report.lora] == [*SEED_TASKS, EXTRA_TASK]
    assert all(0.0 <= r.parse_rate <= 1.0 and r.checked > 0 for r in report.lora)
    # retrain over the seed's three, then add-adapter embeds only the fourth task's samples
    assert report.retrain.adapters == list(SEED_TASKS) and report.retrain.reused_cached == 0
    assert report.add_adapter.adapters == [*SEED_TASKS, EXTRA_TASK]
    assert report.add_adapter.embedded_new == cfg.samples_per_task
    assert report.add_adapter.reused_cached == report.retrain.embedded_new
    registry = Registry.load(tmp_path / "demo" / "registry.yaml")
    assert registry.adapter_names == [*SEED_TASKS, EXTRA_TASK]
    assert read_meta(registry.router_dir).adapters == registry.adapter_names
    assert report.confusion_png.is_file() and report.confusion_png.read_bytes()[:4] == b"\x89PNG"
    assert len(report.acts) == 4 and {a["adapter"] for a in report.acts} <= {*registry.adapter_names, "base"}
    json.dumps(report.acts)  # the act table is plain data
