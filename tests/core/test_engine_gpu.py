"""On a CUDA device (skipped on CPU): the engine in bf16 routes like fp32 on CPU and acts."""

from __future__ import annotations

import pytest
import torch

from tests import engine_helpers as H
from vlrouter.core.engine import Engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_engine_on_cuda_bf16_routes_like_cpu_and_acts(tmp_path, tiny_model_dir):
    reg = H.make_project(tmp_path / "proj", tiny_model_dir)
    cpu = Engine.from_registry(reg, device="cpu", dtype="float32")
    gpu = Engine.from_registry(reg, device="cuda", dtype="bfloat16")
    assert next(gpu.base_model.parameters()).device.type == "cuda"
    for image, prompt, _name in H.samples():
        r_cpu, r_gpu = cpu.route(image, prompt), gpu.route(image, prompt)
        assert r_gpu.adapter == r_cpu.adapter
        for name, p in r_cpu.probs.items():
            assert abs(r_gpu.probs[name] - p) < 0.05
        action = gpu.act(image, prompt, max_new_tokens=4)
        assert action.adapter == r_gpu.adapter and action.timings["vision_calls"] == 1
