"""The retrain recipe: a candidate router carries everything needed to rebuild its head."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.helpers import make_registry
from vlrouter.core.data import build_routing_dataset, load_routing_dataset
from vlrouter.core.features import embed_dataset
from vlrouter.core.head import build_head, head_logits
from vlrouter.core.metrics import calibrate_temperature
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


def test_representation_selection_weighs_classes_inversely_to_their_frequency(tiny_encoder, tmp_path, monkeypatch):
    """With unbalanced training data, cross-validation weighs each class by total / (k * its count)."""
    from tests.helpers import make_dataset
    from vlrouter.core import recipe

    reg = Registry.load(make_registry(tmp_path, tiny_encoder.base_model, ["calendar", "claim-window"], n=4))
    make_dataset(tmp_path / "data" / "claim-window", "claim-window", 12)  # 3x as many samples
    ds = build_routing_dataset(reg, tmp_path / "datasets", seed=0)
    seen = []
    real_choose = recipe.choose
    monkeypatch.setattr(recipe, "choose", lambda *a, **kw: seen.append(kw["weights"]) or real_choose(*a, **kw))
    opts = resolve_options(reg, {"epochs": 2}).model_copy(update={"cache_dir": str(tmp_path / "cache")})
    train_candidate(ds, reg, opts, encoder=tiny_encoder)
    counts = torch.bincount(torch.tensor([s.label for s in load_routing_dataset(ds).split("train")]), minlength=2)
    assert counts[0] < counts[1]
    assert len(seen) == 1 and seen[0] is not None
    assert torch.allclose(seen[0], counts.sum() / (2 * counts.float()))


def test_a_held_out_eval_split_is_scored_into_router_json_beside_the_validation_metrics(tiny_encoder, tmp_path):
    """With --eval-samples, router.json's metrics carry the held-out split's own metrics; its head shape is the
    head's: a linear head has no hidden layer."""
    reg = Registry.load(make_registry(tmp_path, tiny_encoder.base_model, ["calendar", "claim-window"], n=4))
    ds = build_routing_dataset(reg, tmp_path / "datasets", train_samples=2, eval_samples=2, seed=0)
    opts = resolve_options(reg, {"epochs": 5}).model_copy(update={"cache_dir": str(tmp_path / "cache")})
    cand = train_candidate(ds, reg, opts, encoder=tiny_encoder).dir
    saved = json.loads((cand / "router.json").read_text())
    held = saved["metrics"]["eval"]
    assert held["n"] == 4 and sum(map(sum, held["confusion"])) == 4  # 2 per adapter, none of them validation's
    assert held["class_names"] == ["calendar", "claim-window"] and held["temperature"] == saved["temperature"]
    assert saved["metrics"]["n_val"] == len(load_routing_dataset(ds).split("val"))
    head = load_file(str(cand / "head.safetensors"))
    assert saved["head"] == {"kind": "linear", "in_dim": head["1.weight"].shape[1], "hidden": 0, "num_labels": 2}


def test_router_json_records_the_l2_cross_validation_chose_for_lbfgs_and_none_for_adamw(tiny_encoder, tmp_path):
    from vlrouter.core.fit import L2_GRID
    from vlrouter.core.selection import DEFAULT_L2

    reg = Registry.load(make_registry(tmp_path, tiny_encoder.base_model, ["calendar", "claim-window"], n=4))
    ds = build_routing_dataset(reg, tmp_path / "datasets", seed=0)
    opts = resolve_options(reg, {"epochs": 5}).model_copy(update={"cache_dir": str(tmp_path / "cache"),
                                                                   "solver": "lbfgs"})
    assert opts.l2 == "auto"
    cand = train_candidate(ds, reg, opts, encoder=tiny_encoder)
    lbfgs = json.loads((cand.dir / "router.json").read_text())
    assert cand.stats["train"]["solver"] == "lbfgs" and cand.stats["train"]["l2"] == lbfgs["l2"]
    assert "history" not in cand.stats["train"]  # per-evaluation history stays out of the run's summary
    tried = [c["l2"] for c in lbfgs["selection"]["l2_candidates"]]
    assert tried == list(L2_GRID) and lbfgs["l2"] == lbfgs["selection"]["l2"] and lbfgs["l2"] in L2_GRID
    adamw = opts.model_copy(update={"solver": "adamw"})  # l2 only compares representations, at the default
    saved = json.loads((train_candidate(ds, reg, adamw, encoder=tiny_encoder).dir / "router.json").read_text())
    assert saved["solver"] == "adamw" and saved["l2"] is None
    assert saved["selection"]["l2"] == DEFAULT_L2 and saved["selection"]["l2_candidates"] == []


def test_split_features_survive_the_file_a_remote_backend_hands_over(tmp_path):
    """to_file/from_file (Modal's embed -> fit hand-over): every split's views, labels, encoder and stats come
    back; a dataset without an eval split comes back without one."""
    from vlrouter.core.encoder import EncoderInfo
    from vlrouter.core.recipe import SplitFeatures

    g = torch.Generator().manual_seed(0)
    info = EncoderInfo(base_model="/models/tiny", hidden_size=4, num_layers=2, fingerprint="abc123")

    def views(n):
        return {"mean@2": torch.randn(n, 4, generator=g), "image-grid@1": torch.randn(n, 8, generator=g)}

    full = SplitFeatures(class_names=["calendar", "claim-window"], encoder=info, layers=[1, 2], train=views(5),
                         train_y=[0, 1, 0, 1, 1], val=views(2), val_y=[1, 0], eval=views(3), eval_y=[0, 0, 1],
                         stats={"embedded_new": 10, "reused_cached": 0})
    back = SplitFeatures.from_file(full.to_file(tmp_path / "run" / "embed" / "features.safetensors"))
    assert (back.class_names, back.encoder, back.layers, back.stats) == (full.class_names, info, [1, 2], full.stats)
    assert (back.train_y, back.val_y, back.eval_y) == (full.train_y, full.val_y, full.eval_y)
    for split in ("train", "val", "eval"):
        want, got = getattr(full, split), getattr(back, split)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), split
    no_eval = SplitFeatures(class_names=full.class_names, encoder=info, layers=[2], train=full.train,
                            train_y=full.train_y, val=full.val, val_y=full.val_y)
    back = SplitFeatures.from_file(no_eval.to_file(tmp_path / "no-eval.safetensors"))
    assert back.eval is None and back.eval_y == [] and back.layers == [2]


def test_an_adamw_heads_temperature_comes_from_its_validation_logits_and_lbfgs_adds_the_cv_logits(tmp_path):
    """fit_candidate on given features (what a remote backend hands over): the lbfgs head is calibrated on its
    validation logits plus the training split's out-of-fold logits; the adamw head on its own logits only."""
    from tests.helpers import blobs
    from vlrouter.core.encoder import EncoderInfo
    from vlrouter.core.options import TrainOptions
    from vlrouter.core.recipe import SplitFeatures, fit_candidate

    hub = "Qwen/Qwen3-VL-8B-Instruct"
    reg = Registry.load(make_registry(tmp_path, hub, ["calendar", "claim-window"], n=3))
    ds = build_routing_dataset(reg, tmp_path / "datasets", seed=0)
    x, y = blobs(n_per_class=(20, 20), dim=8, spread=3.0)  # overlapping: neither CV nor validation is perfect
    vx, vy = blobs(n_per_class=(6, 6), dim=8, seed=1, spread=3.0)
    shift = torch.linspace(0, 1, 8)

    def views(a):  # two layers, so cross-validation compares candidates and keeps their out-of-fold logits
        return {"mean@1": a + shift, "mean@2": a}

    features = SplitFeatures(class_names=["calendar", "claim-window"], layers=[1, 2],
                             encoder=EncoderInfo(base_model=hub, hidden_size=8, num_layers=2, fingerprint="f"),
                             train=views(x), train_y=y.tolist(), val=views(vx), val_y=vy.tolist(), stats={})
    temperatures = {}
    for solver in ("adamw", "lbfgs"):
        opts = TrainOptions(base_model=hub, pooling="mean", solver=solver, l2=0.1, ood="off", epochs=5, batch_size=8,
                            lr=0.01, workers=1)
        cand = fit_candidate(ds, features, opts, out_dir=tmp_path / solver)
        head, meta = load_router(cand.dir)
        val_only = calibrate_temperature(head_logits(head, meta.representation().features(cand.val_views)),
                                         vy.tolist())
        temperatures[solver] = (meta.temperature, val_only)
        assert (meta.embedded_new, meta.reused_cached) == (0, 0)  # nothing embedded here
    assert temperatures["adamw"][0] == temperatures["adamw"][1]
    assert temperatures["lbfgs"][0] != temperatures["lbfgs"][1]
