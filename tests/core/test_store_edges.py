"""The router store's edges: a router.json with a bad field names it, the lock folder is made, a live router
that does not fit the candidate's features does not block promotion."""

from __future__ import annotations

import json

import pytest
import torch

from vlrouter.core.errors import CheckpointError
from vlrouter.core.gate import promote_with_gate
from vlrouter.core.head import HeadShape, build_head
from vlrouter.core.store import RouterLock, RouterMeta, load_router, promote, read_meta, save_router

BASE = "Qwen/Qwen3-VL-8B-Instruct"


def _router(folder, in_dim: int, acc: float):
    shape = HeadShape(in_dim=in_dim, num_labels=2)
    meta = RouterMeta(adapters=["a", "b"], base_model=BASE, pooling="mean", layer=-1, hidden_size=in_dim, head=shape,
                      metrics={"val_acc": acc, "n_val": 4}, encoder_fingerprint="enc")
    return save_router(folder, build_head(shape), meta)


def test_an_invalid_router_json_field_is_named(tmp_path):
    folder = _router(tmp_path / "r", 4, 1.0)
    meta = json.loads((folder / "router.json").read_text())
    (folder / "router.json").write_text(json.dumps({**meta, "layer": "last"}))
    with pytest.raises(CheckpointError, match=r"router\.json.*layer.*invalid router\.json"):
        read_meta(folder)


def test_the_lock_makes_the_router_folders_parents(tmp_path):
    router_dir = tmp_path / "a" / "b" / "runs" / "router"
    with RouterLock(router_dir) as lock:
        assert lock.path.exists()


def test_a_live_router_that_does_not_fit_the_features_does_not_block_promotion(tmp_path):
    live = tmp_path / "router"
    promote(_router(tmp_path / "old", 4, 1.0), live)  # hand-copied, same labels and encoder, other width
    cand = _router(tmp_path / "new", 8, 0.75)
    head, _ = load_router(cand)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    labels = head(x).argmax(1).tolist()  # samples the candidate gets right: it beats chance
    assert len(set(labels)) == 2
    d = promote_with_gate(cand, live, val_views={"mean@-1": x}, val_labels=labels)
    assert d.promoted and d.live_val_acc is None and "does not fit" in d.message
    assert read_meta(live).hidden_size == 8


def test_without_validation_features_the_gate_promotes_and_says_why(tmp_path):
    live = tmp_path / "router"
    promote(_router(tmp_path / "old", 4, 1.0), live)
    d = promote_with_gate(_router(tmp_path / "new", 4, 0.75), live)  # below the live 1.0, above chance 0.5
    assert d.promoted and d.live_val_acc is None and "no validation features" in d.message


def test_router_json_defaults_for_what_a_writer_left_out():
    meta = RouterMeta(adapters=["a", "b"], base_model=BASE, pooling="mean", layer=-1, hidden_size=4,
                      head=HeadShape(in_dim=4, num_labels=2))
    assert (meta.temperature, meta.embedded_new, meta.reused_cached, meta.metrics) == (1.0, 0, 0, {})
    assert meta.best_loss is None and meta.best_acc is None and meta.created_at


def test_without_validation_features_chance_counts_only_the_adapters_validation_held(tmp_path):
    """router.json's per-class recalls: an adapter with no validation samples is neither a recall nor a class."""
    from vlrouter.core.errors import PromotionRefused

    shape = HeadShape(in_dim=4, num_labels=3)
    per = {"a": {"recall": 0.5, "support": 4}, "b": {"recall": 0.5, "support": 4}, "c": {"recall": 0.0, "support": 0}}
    meta = RouterMeta(adapters=["a", "b", "c"], base_model=BASE, pooling="mean", layer=-1, hidden_size=4, head=shape,
                      metrics={"val_acc": 0.5, "n_val": 8, "per_class": per}, encoder_fingerprint="enc")
    cand = save_router(tmp_path / "cand", build_head(shape), meta)
    with pytest.raises(PromotionRefused, match=r"balanced accuracy 0.500 does not beat chance 0.500 on 8 validation"):
        promote_with_gate(cand, tmp_path / "router", force=True)
