"""The retrain recipe: a candidate router carries everything needed to rebuild its head."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.helpers import make_registry
from vlrouter.core.data import build_routing_dataset, load_routing_dataset
from vlrouter.core.features import embed_dataset
from vlrouter.core.head import build_head, head_logits
from vlrouter.core.options import resolve_options
from vlrouter.core.recipe import train_candidate
from vlrouter.core.registry import Registry
from vlrouter.core.store import load_router


def test_train_on_dataset_candidate_reloads_to_identical_logits(tiny_encoder, tmp_path):
    """router.json carries everything to rebuild the head: reloading reproduces its logits exactly."""
    reg = Registry.load(make_registry(tmp_path, tiny_encoder.base_model, ["calendar", "claim-window"], n=6))
    opts = resolve_options(reg, {"epochs": 5})
    ds = build_routing_dataset(reg, tmp_path / "datasets", seed=0)
    opts = opts.model_copy(update={"cache_dir": str(tmp_path / "cache")})
    cand = train_candidate(ds, reg, opts, encoder=tiny_encoder).dir
    head, meta = load_router(cand)
    assert meta.adapters == ["calendar", "claim-window"] and meta.registry_fingerprint == reg.fingerprint()
    assert meta.encoder_fingerprint == tiny_encoder.fingerprint() and meta.embedded_new == 12
    assert {"val_acc", "per_class", "confusion", "ece", "ece_calibrated", "n_val"} <= set(meta.metrics)
    assert "live_val_acc" not in meta.metrics  # no live router yet
    val = load_routing_dataset(ds).split("val")
    views, st = embed_dataset(tiny_encoder, val, tmp_path / "cache", layers=[meta.layer])
    assert st["embedded_new"] == 0
    feats = meta.representation().features(views)
    original = build_head(meta.head)
    saved = load_file(str(cand / "head.safetensors"))
    original.load_state_dict({k: v for k, v in saved.items() if not k.startswith("ood.")})
    assert torch.equal(head_logits(head, feats), head_logits(original, feats))
    assert json.loads((cand / "router.json").read_text())["dataset_fingerprint"] == meta.dataset_fingerprint
