"""Head training, calibration, metrics, option resolution, the eval gate and the retrain lock."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import make_registry
from vlrouter.core.errors import InputError, LockHeldError, PromotionRefused
from vlrouter.core.head import HeadShape, RouterMeta, build_head, load_router, promote, read_meta
from vlrouter.core.registry import Registry, TrainSection
from vlrouter.core.train import (
    RouterLock,
    calibrate_temperature,
    classification_metrics,
    evaluate,
    expected_calibration_error,
    promote_with_gate,
    resolve_options,
    run_retrain,
    train_head,
    write_candidate,
)

BASE = "Qwen/Qwen3-VL-8B-Instruct"


def _blobs(n_per_class=(20, 20, 20), dim=16, seed=0, spread=1.0):
    """Gaussian clusters, one per class: (x, y)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(len(n_per_class), dim, generator=g) * 3
    xs, ys = [], []
    for c, n in enumerate(n_per_class):
        xs.append(centers[c] + spread * torch.randn(n, dim, generator=g))
        ys += [c] * n
    return torch.cat(xs), torch.tensor(ys)


def _opts(**kw) -> TrainSection:
    base = {"epochs": 30, "batch_size": 8, "lr": 0.01, "patience": 5, "eval_every": 5, "seed": 0}
    return TrainSection(**{**base, **kw})


def test_head_learns_separable_features_and_reports_best_eval():
    x, y = _blobs()
    vx, vy = _blobs(seed=0, n_per_class=(5, 5, 5))
    head, stats = train_head(x, y, vx, vy, _opts(), num_labels=3)
    assert stats["best_acc"] == 1.0 and stats["best_loss"] < 0.3
    assert not head.training
    assert evaluate(head, vx, vy, class_names=["a", "b", "c"])["accuracy"] == 1.0


def test_same_data_and_seed_give_identical_weights():
    x, y = _blobs()
    vx, vy = _blobs(n_per_class=(4, 4, 4), seed=1)
    for kind in ("linear", "mlp"):  # the MLP has dropout: seeded too
        opts = _opts(head=kind, head_hidden=32)
        a, _ = train_head(x, y, vx, vy, opts, num_labels=3)
        torch.manual_seed(1234)  # the global RNG state must not matter
        b, _ = train_head(x, y, vx, vy, opts, num_labels=3)
        for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(ta, tb), name
        c, _ = train_head(x, y, vx, vy, opts.model_copy(update={"seed": 1}), num_labels=3)
        assert not torch.equal(a[-1].weight, c[-1].weight)  # the seed matters


def test_early_stopping_counts_patience_in_evaluations(tmp_path):
    x, y = _blobs(spread=6.0)  # overlapping: val loss soon stops improving
    vx, vy = _blobs(n_per_class=(6, 6, 6), seed=5, spread=6.0)
    head, stats = train_head(x, y, vx, vy, _opts(epochs=500, patience=2, eval_every=1, lr=0.05), num_labels=3,
                             log_dir=tmp_path / "tb")
    assert stats["stopped_early"]
    assert stats["steps"] - stats["best_step"] == 2  # two evaluations without improvement, one per step
    assert stats["steps"] < 500 * 8
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # TensorBoard logs


def test_imbalanced_classes_get_inverse_frequency_weights():
    x, y = _blobs(n_per_class=(30, 10, 5))
    vx, vy = _blobs(n_per_class=(3, 3, 3), seed=2)
    _, stats = train_head(x, y, vx, vy, _opts(epochs=2), num_labels=3)
    w = stats["class_weights"]
    assert w[0] < w[1] < w[2] and w[2] == pytest.approx(45 / (3 * 5), rel=1e-3)
    _, balanced = train_head(*_blobs(), vx, vy, _opts(epochs=2), num_labels=3)
    assert balanced["class_weights"] is None


def test_temperature_fixes_overconfidence_and_ece_drops():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    logits = torch.randn(300, 3, generator=g)
    logits[torch.arange(300), y] += 1.0  # ~60% accurate ...
    logits *= 8  # ... but very confident
    t = calibrate_temperature(logits, y)
    assert t > 2
    before = torch.nn.functional.cross_entropy(logits, y)
    after = torch.nn.functional.cross_entropy(logits / t, y)
    assert after < before
    assert expected_calibration_error(torch.softmax(logits / t, 1), y) < expected_calibration_error(
        torch.softmax(logits, 1), y)


def test_classification_metrics_per_class_and_confusion():
    m = classification_metrics([0, 0, 1, 1, 2, 0], [0, 1, 1, 1, 2, 2], ["a", "b", "c"])
    assert m["confusion"] == [[1, 0, 0], [1, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["a"] == {"precision": pytest.approx(1 / 3, abs=1e-4), "recall": 1.0, "f1": 0.5,
                                   "support": 1}
    assert m["per_class"]["b"]["precision"] == 1.0 and m["per_class"]["b"]["recall"] == pytest.approx(0.6667, 1e-3)


def test_options_resolve_defaults_then_registry_then_flags(tmp_path):
    path = make_registry(tmp_path, BASE, ["calendar", "claim-window"], n=2, epochs=7, lr=0.5)
    reg = Registry.load(path)
    o = resolve_options(reg, {})
    assert (o.epochs, o.lr, o.patience, o.base_model) == (7, 0.5, 8, BASE)  # registry over defaults
    assert o.val_fraction == TrainSection().val_fraction  # default where the registry is silent
    o = resolve_options(reg, {"epochs": 3, "lr": None, "base_model_id": "Qwen/Other", "train_samples": 9})
    assert (o.epochs, o.lr, o.base_model, o.train_samples) == (3, 0.5, "Qwen/Other", 9)  # flags over registry
    with pytest.raises(InputError, match="unknown training option 'epoch'"):
        resolve_options(reg, {"epoch": 3})
    with pytest.raises(InputError, match="epochs"):
        resolve_options(reg, {"epochs": 0})


# ---- the eval gate --------------------------------------------------------------------------

def _router(dirpath: Path | None, live: Path, *, acc: float, live_acc: float | None, adapters=("a", "b"),
            fp="enc1") -> Path:
    shape = HeadShape(in_dim=4, num_labels=len(adapters))
    torch.manual_seed(int(acc * 100))
    head = build_head(shape)
    metrics = {"val_acc": acc, "n_val": 48}
    if live_acc is not None:
        metrics.update(live_val_acc=live_acc, live_version=os.path.realpath(live))
    meta = RouterMeta(adapters=list(adapters), base_model=BASE, pooling="mean", layer=-1, hidden_size=4, head=shape,
                      metrics=metrics, encoder_fingerprint=fp)
    return write_candidate(live, head, meta, candidate_dir=dirpath)


def _snapshot(live: Path) -> tuple:
    return os.readlink(live), (live / "router.json").read_bytes(), (live / "head.safetensors").read_bytes()


def test_gate_refuses_a_worse_candidate_with_both_numbers_and_force_promotes(tmp_path):
    live = tmp_path / "runs" / "router"
    promote(_router(None, live, acc=0.875, live_acc=None), live)
    before = _snapshot(live)
    worse = _router(None, live, acc=0.8125, live_acc=0.875)
    with pytest.raises(PromotionRefused) as e:
        promote_with_gate(worse, live, force=False)
    msg = str(e.value)
    assert "new router 0.812 < live 0.875 on the same 48 validation samples" in msg
    assert "kept the live router" in msg and "--force" in msg
    assert _snapshot(live) == before
    decision = promote_with_gate(worse, live, force=True)
    assert decision.promoted and "--force" in decision.message
    assert os.path.realpath(live) == os.path.realpath(worse)


def test_gate_promotes_equal_or_better_and_other_label_sets(tmp_path):
    live = tmp_path / "router"
    promote(_router(None, live, acc=0.5, live_acc=None), live)
    assert promote_with_gate(_router(None, live, acc=0.5, live_acc=0.5), live).promoted  # a tie promotes
    d = promote_with_gate(_router(None, live, acc=0.4, live_acc=0.9, adapters=("a", "b", "c")), live)
    assert d.promoted and "other labels" in d.message  # not comparable: a new label set
    d = promote_with_gate(_router(None, live, acc=0.3, live_acc=0.9, adapters=("a", "b", "c"), fp="enc2"), live)
    assert d.promoted and "another encoder" in d.message
    assert read_meta(live).encoder_fingerprint == "enc2"


def test_a_held_lock_refuses_a_second_retrain_and_touches_nothing(tmp_path):
    path = make_registry(tmp_path, BASE, ["calendar", "claim-window"], n=3)
    reg = Registry.load(path)
    before = path.read_bytes()
    with RouterLock(reg) as lock:
        with pytest.raises(LockHeldError, match="another retrain holds the lock") as e:
            run_retrain(reg, overrides={})
        assert str(lock.path) in str(e.value)
    assert path.read_bytes() == before
    assert not (tmp_path / "datasets").exists()  # refused before doing any work


def test_train_on_dataset_candidate_reloads_to_identical_logits(tiny_encoder, tmp_path):
    """router.json carries everything to rebuild the head: reloading reproduces its logits exactly."""
    from vlrouter.core.data import build_routing_dataset, load_routing_dataset
    from vlrouter.core.features import embed_dataset
    from vlrouter.core.train import head_logits, resolve_options, train_on_dataset

    reg = Registry.load(make_registry(tmp_path, tiny_encoder.base_model, ["calendar", "claim-window"], n=6))
    opts = resolve_options(reg, {"epochs": 5})
    ds = build_routing_dataset(reg, tmp_path / "datasets", seed=0)
    cand, stats = train_on_dataset(ds, opts, live_dir=reg.router_dir, cache_root=tmp_path / "cache",
                                   registry_fingerprint=reg.fingerprint(), encoder=tiny_encoder)
    head, meta = load_router(cand)
    assert meta.adapters == ["calendar", "claim-window"] and meta.registry_fingerprint == reg.fingerprint()
    assert meta.encoder_fingerprint == tiny_encoder.fingerprint() and meta.embedded_new == 12
    assert {"val_acc", "per_class", "confusion", "ece", "ece_calibrated", "n_val"} <= set(meta.metrics)
    assert "live_val_acc" not in meta.metrics  # no live router yet
    val = load_routing_dataset(ds).split("val")
    feats, st = embed_dataset(tiny_encoder, val, tmp_path / "cache")
    assert st["embedded_new"] == 0
    from safetensors.torch import load_file

    original = build_head(meta.head)
    original.load_state_dict(load_file(str(cand / "head.safetensors")))
    assert torch.equal(head_logits(head, feats), head_logits(original, feats))
    assert json.loads((cand / "router.json").read_text())["dataset_fingerprint"] == meta.dataset_fingerprint
