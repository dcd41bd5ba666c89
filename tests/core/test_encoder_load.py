"""The base model loads frozen: no parameter asks for gradients (memory, and no accidental training)."""

from __future__ import annotations

from vlrouter.core.encoder import load_base_model


def test_the_base_model_is_loaded_frozen_in_eval_mode(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
