"""The base model loads frozen: no parameter asks for gradients (memory, and no accidental training)."""

from __future__ import annotations

from vlrouter.core.encoder import load_base_model


def test_the_base_model_is_loaded_frozen_in_eval_mode(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_auto_dtype_is_bf16_on_gpu_and_fp32_on_cpu():
    import torch

    from vlrouter.core.encoder import resolve_dtype

    assert resolve_dtype("auto", "cuda") is torch.bfloat16 and resolve_dtype(None, "cuda:1") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16 and resolve_dtype("float16", "cuda") is torch.float16
