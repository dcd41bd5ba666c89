"""The router store: the eval gate (live router read once, scored on the same samples), promotion, the lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import make_registry
from vlrouter.backends.local import retrain_local
from vlrouter.core.errors import LockHeldError, PromotionRefused
from vlrouter.core.head import HeadShape, build_head
from vlrouter.core.options import resolve_options
from vlrouter.core.recipe import run_retrain
from vlrouter.core.registry import Registry
from vlrouter.core.store import (
    RouterLock,
    RouterMeta,
    new_version_dir,
    promote,
    promote_with_gate,
    read_meta,
    save_router,
)

BASE = "Qwen/Qwen3-VL-8B-Instruct"


def _router(live: Path, *, acc: float, adapters=("a", "b"), fp="enc1", bias: int | None = None) -> Path:
    """A candidate beside ``live`` whose router.json says val accuracy ``acc``. Its head predicts class
    ``bias`` for every input (when given), so its accuracy on :data:`VAL` is known exactly; otherwise it
    reads feature 0, which separates the classes (a router that beats chance, as the gate requires)."""
    shape = HeadShape(in_dim=4, num_labels=len(adapters))
    torch.manual_seed(int(acc * 100))
    head = build_head(shape)
    with torch.no_grad():
        head[-1].weight.zero_()
        head[-1].bias.zero_()
        if bias is not None:
            head[-1].bias[bias] = 1.0
        else:
            head[-1].weight[0, 0], head[-1].weight[1, 0] = -1.0, 1.0
    meta = RouterMeta(adapters=list(adapters), base_model=BASE, pooling="mean", layer=-1, hidden_size=4, head=shape,
                      metrics={"val_acc": acc, "n_val": 48}, encoder_fingerprint=fp)
    return save_router(new_version_dir(live), head, meta)


# 48 validation samples: 42 of class 0, 6 of class 1. A head that always says 0 scores 0.875.
# Feature 0 is -2 for class 0 and +2 for class 1 (what a head that beats chance reads).
VAL_Y = [0] * 42 + [1] * 6
VAL_X = torch.randn(48, 4, generator=torch.Generator().manual_seed(0))
VAL_X[:, 0] = torch.tensor([-2.0 if y == 0 else 2.0 for y in VAL_Y])


def _snapshot(live: Path) -> tuple:
    return os.readlink(live), (live / "router.json").read_bytes(), (live / "head.safetensors").read_bytes()


def test_gate_refuses_a_worse_candidate_with_both_numbers_and_force_promotes(tmp_path):
    live = tmp_path / "runs" / "router"
    promote(_router(live, acc=0.875, bias=0), live)  # scores 0.875 on VAL
    before = _snapshot(live)
    worse = _router(live, acc=0.8125)
    with pytest.raises(PromotionRefused) as e:
        promote_with_gate(worse, live, val_feats=VAL_X, val_labels=VAL_Y, force=False)
    msg = str(e.value)
    assert "new router 0.812 < live 0.875 on the same 48 validation samples" in msg
    assert "kept the live router" in msg and "--force" in msg
    assert _snapshot(live) == before
    decision = promote_with_gate(worse, live, val_feats=VAL_X, val_labels=VAL_Y, force=True)
    assert decision.promoted and "--force" in decision.message
    assert os.path.realpath(live) == os.path.realpath(worse)


def test_gate_promotes_equal_or_better_and_other_label_sets(tmp_path):
    live = tmp_path / "router"
    promote(_router(live, acc=0.5, bias=1), live)  # scores 0.125 on VAL
    d = promote_with_gate(_router(live, acc=0.125), live, val_feats=VAL_X, val_labels=VAL_Y)
    assert d.promoted and d.live_val_acc == 0.125  # a tie promotes
    d = promote_with_gate(_router(live, acc=0.1, adapters=("a", "b", "c")), live, val_feats=VAL_X, val_labels=VAL_Y)
    assert d.promoted and "other labels" in d.message  # not comparable: a new label set
    d = promote_with_gate(_router(live, acc=0.05, adapters=("a", "b", "c"), fp="enc2"), live, val_feats=VAL_X,
                          val_labels=VAL_Y)
    assert d.promoted and "another encoder" in d.message
    assert read_meta(live).encoder_fingerprint == "enc2"


def test_a_held_lock_refuses_a_second_retrain_and_touches_nothing(tmp_path):
    path = make_registry(tmp_path, BASE, ["calendar", "claim-window"], n=3)
    reg = Registry.load(path)
    before = path.read_bytes()
    with RouterLock(reg.router_dir) as lock:
        with pytest.raises(LockHeldError, match="another retrain holds the lock") as e:
            run_retrain(reg, resolve_options(reg), retrain_local)
        assert str(lock.path) in str(e.value)
    assert path.read_bytes() == before
    assert not (tmp_path / "datasets").exists()  # refused before doing any work
