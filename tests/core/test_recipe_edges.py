"""Retraining's edges: Ctrl-C during training leaves nothing half-written, `router eval` notes only a real
encoder change, a registry whose checkpoint is no PEFT folder is named."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import pytest

from tests.helpers import make_registry, retrain
from vlrouter.backends.local import retrain_local
from vlrouter.core.errors import RegistryError
from vlrouter.core.options import resolve_options
from vlrouter.core.progress import RecordingProgress
from vlrouter.core.recipe import evaluate_router, run_retrain
from vlrouter.core.registry import Registry
from vlrouter.core.store import versions_dir

TASKS = ["calendar", "claim-window"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    path = make_registry(tmp_path_factory.mktemp("recipe") / "proj", tiny_model_dir, TASKS, n=8, epochs=5)
    retrain(path)
    return path


class InterruptTraining(RecordingProgress):
    """Ctrl-C as soon as head training reports progress."""

    interrupted = False

    @contextmanager
    def task(self, description, total=None):
        with super().task(description, total) as handle:
            if "train" not in description:
                yield handle
                return
            outer = self

            class Interrupting:
                def advance(self, n=1):
                    outer.interrupted = True
                    raise KeyboardInterrupt

            yield Interrupting()


def _live(reg: Registry) -> tuple:
    live = reg.router_dir
    return os.readlink(live), (live / "router.json").read_bytes(), (live / "head.safetensors").read_bytes()


def test_ctrl_c_during_training_leaves_no_candidate_and_the_live_router(project):
    reg = Registry.load(project)
    before, versions = _live(reg), sorted(os.listdir(versions_dir(reg.router_dir)))
    prog = InterruptTraining()
    with pytest.raises(KeyboardInterrupt):
        run_retrain(reg, resolve_options(reg), retrain_local, progress=prog)
    assert prog.interrupted, "no progress task named 'train...' advanced: move the interrupt to head training"
    assert _live(reg) == before
    assert sorted(os.listdir(versions_dir(reg.router_dir))) == versions  # the half-written candidate is gone
    assert run_retrain(reg, resolve_options(reg), retrain_local, force=True).promoted  # and the lock was released


def test_eval_notes_an_encoder_change_only_when_there_is_one(project):
    reg = Registry.load(project)
    prog = RecordingProgress()
    metrics = evaluate_router(reg, resolve_options(reg), progress=prog)
    assert 0.0 <= metrics["metrics"]["accuracy"] <= 1.0 and metrics["embedded_new"] == 0  # features cached
    assert not [m for m in prog.messages if "fingerprint" in m]
    meta_path = reg.router_dir / "router.json"  # a router trained with another encoder
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "encoder_fingerprint": "0123456789abcdef"}))
    try:
        evaluate_router(reg, resolve_options(reg), progress=prog)
    finally:
        meta_path.write_text(json.dumps(meta))
    assert [m for m in prog.messages if "fingerprint" in m and "0123456789abcdef" in m]


def test_a_checkpoint_without_adapter_config_is_named(project, tmp_path):
    reg = Registry.load(project)
    for name in TASKS:
        (reg.resolve(f"checkpoints/{name}")).mkdir(parents=True, exist_ok=True)
    (reg.resolve("checkpoints/calendar") / "adapter_config.json").write_text("{}")
    reg.check_paths()  # datasets only: fine
    with pytest.raises(RegistryError, match=r"adapters\[1\]\.checkpoint.*claim-window.*not a PEFT adapter folder"):
        reg.check_paths(checkpoints=True)
    reg.check_paths(["calendar"], checkpoints=True)  # only the adapters asked about


def test_train_refuses_an_out_of_range_layer_at_its_line_before_anything_runs(tmp_path, tiny_model_dir):
    from vlrouter.core.errors import InputError
    from vlrouter.core.recipe import run_train

    path = make_registry(tmp_path / "proj", tiny_model_dir, TASKS, n=2, router={"layer": 99})
    reg = Registry.load(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "layer: 99" in text)
    with pytest.raises(InputError) as e:
        run_train(reg, resolve_options(reg))  # no routing dataset built yet: the layer is checked first
    assert str(e.value).startswith(f"{path}:{line}: router.layer: 99 is out of range for a model with"), str(e.value)
    assert not reg.router_dir.exists() and not reg.resolve("datasets").exists()


def test_train_reports_the_solver_it_used(project):
    from vlrouter.core.recipe import run_train

    reg = Registry.load(project)
    result = run_train(reg, resolve_options(reg), force=True)
    assert result.solver in ("lbfgs", "adamw") and result.solver == json.loads(
        (reg.router_dir / "router.json").read_text())["solver"]


def test_eval_lists_every_sample_with_its_routing(project):
    from vlrouter.core.data import load_routing_dataset, newest_routing_dataset

    reg = Registry.load(project)
    opts = resolve_options(reg)
    out = evaluate_router(reg, opts)
    val = load_routing_dataset(newest_routing_dataset(reg.resolve(opts.datasets_dir))).split("val")
    rows = out["samples"]
    assert [(r["id"], r["adapter"], r["prompt"]) for r in rows] == [(s.id, s.adapter, s.prompt) for s in val]
    for r in rows:
        assert set(r["probs"]) == set(TASKS) and abs(sum(r["probs"].values()) - 1) < 1e-6
        assert r["routed"] == max(r["probs"], key=r["probs"].get) and isinstance(r["known"], bool)
    assert out["metrics"]["accuracy"] == pytest.approx(sum(r["routed"] == r["adapter"] for r in rows) / len(rows))


def test_eval_scores_every_sample_against_the_routers_ood_statistics(project):
    from vlrouter.core.store import read_router

    reg = Registry.load(project)
    router = read_router(reg.router_dir)
    assert router.ood is not None  # router.ood: auto (the default) saved statistics
    rows = evaluate_router(reg, resolve_options(reg))["samples"]
    scores = [r["ood_score"] for r in rows]
    assert all(isinstance(s, float) for s in scores) and len(set(scores)) > 1  # each sample its own score
    assert [r["known"] for r in rows] == [s <= router.ood.threshold for s in scores]


def test_eval_refuses_a_cache_dir_that_cannot_be_a_folder_before_loading_the_model(project, tmp_path, monkeypatch):
    from vlrouter.core import recipe
    from vlrouter.core.errors import StorageError

    reg = Registry.load(project)
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    monkeypatch.setattr(recipe, "load_encoder", lambda *a, **kw: pytest.fail("the model was loaded first"))
    opts = resolve_options(reg).model_copy(update={"cache_dir": str(blocker)})
    with pytest.raises(StorageError, match=r"train\.cache_dir"):
        evaluate_router(reg, opts)


def test_embedding_honours_router_max_prompt_tokens(project, tmp_path):
    from vlrouter.core.errors import InputError
    from vlrouter.core.recipe import run_embed

    reg = Registry.load(project)
    opts = resolve_options(reg).model_copy(update={"cache_dir": str(tmp_path / "cache"), "max_prompt_tokens": 2})
    with pytest.raises(InputError, match="over router.max_prompt_tokens=2"):
        run_embed(reg, opts)  # nothing cached: every prompt is tokenized, and none fits in 2 tokens


def test_nan_features_are_refused_before_training_naming_the_view_and_the_fix(project, tiny_encoder, monkeypatch):
    from vlrouter.core import recipe
    from vlrouter.core.data import newest_routing_dataset
    from vlrouter.core.errors import InputError

    reg = Registry.load(project)
    opts = resolve_options(reg)
    ds = newest_routing_dataset(reg.resolve(opts.datasets_dir))
    real = recipe.embed_dataset

    def overflowing(*a, **kw):  # what a float16 base model that overflows produces
        views, stats = real(*a, **kw)
        key = sorted(views)[0]
        views[key][1, 0] = float("inf")
        return views, stats

    monkeypatch.setattr(recipe, "embed_dataset", overflowing)
    with pytest.raises(InputError) as e:
        recipe.embed_splits(ds, tiny_encoder, reg.resolve(opts.cache_dir),  # cached by the retrain: nothing embeds
                            layers=recipe.layers_to_embed("auto", tiny_encoder.num_layers))
    assert f"{ds}: " in str(e.value) and "1 feature rows contain NaN/inf" in str(e.value)
    assert "router.dtype: float32" in str(e.value)


def test_retrain_refuses_a_datasets_dir_that_cannot_be_a_folder_before_the_backend_runs(project, tmp_path):
    from vlrouter.core.errors import StorageError

    reg = Registry.load(project)
    blocker = tmp_path / "datasets"
    blocker.write_text("not a folder")
    opts = resolve_options(reg).model_copy(update={"datasets_dir": str(blocker)})
    called = []
    with pytest.raises(StorageError, match=r"train\.datasets_dir"):
        run_retrain(reg, opts, lambda request: called.append(request))
    assert not called


def test_eval_probabilities_are_the_routers_softmax_after_its_temperature(project, tiny_encoder):
    import torch

    from vlrouter.core.data import load_routing_dataset, newest_routing_dataset
    from vlrouter.core.features import FeatureCache, embed_dataset
    from vlrouter.core.head import head_logits
    from vlrouter.core.store import read_router

    reg = Registry.load(project)
    opts = resolve_options(reg)
    router = read_router(reg.router_dir)
    assert router.meta.temperature != 1.0  # calibrated: the division is visible
    val = load_routing_dataset(newest_routing_dataset(reg.resolve(opts.datasets_dir))).split("val")
    rep = router.meta.representation()
    views, _ = embed_dataset(tiny_encoder, val, FeatureCache(reg.resolve(opts.cache_dir), tiny_encoder.fingerprint()),
                             layers=[rep.layer])
    want = torch.softmax(head_logits(router.head, rep.features(views)).double() / router.meta.temperature, dim=-1)
    rows = evaluate_router(reg, opts)["samples"]
    got = torch.tensor([[r["probs"][name] for name in router.meta.adapters] for r in rows], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_the_encoder_is_loaded_with_the_runs_model_settings_and_prompt_limit(project, monkeypatch):
    from types import SimpleNamespace

    from vlrouter.core import recipe
    from vlrouter.core.encoder import prompt_token_limit

    reg = Registry.load(project)
    opts = resolve_options(reg).model_copy(update={"device": "cpu", "dtype": "float32", "max_prompt_tokens": 77,
                                                   "base_model_revision": "v1.2"})
    calls = []
    monkeypatch.setattr(recipe.Encoder, "load", lambda *a, **kw: calls.append((a, kw)) or SimpleNamespace(
        processor=SimpleNamespace()))
    enc = recipe.load_encoder(opts)
    assert calls == [((opts.base_model,), {"device": "cpu", "dtype": "float32", "revision": "v1.2"})]
    assert prompt_token_limit(enc.processor) == 77


def test_eval_of_a_format_1_router_counts_its_negative_layer_with_the_models_depth(project):
    reg = Registry.load(project)
    meta_path = reg.router_dir / "router.json"
    meta = json.loads(meta_path.read_text())
    old = {k: v for k, v in meta.items() if k != "num_layers"}  # format 1: no depth recorded, layer -1 = the last
    meta_path.write_text(json.dumps({**old, "layer": meta["layer"] - meta["num_layers"] - 1}))
    try:
        out = evaluate_router(reg, resolve_options(reg))
    finally:
        meta_path.write_text(json.dumps(meta))
    assert out["layer"] == meta["layer"] and out["embedded_new"] == 0  # the same features the router trained on
    assert out["metrics"]["accuracy"] == evaluate_router(reg, resolve_options(reg))["metrics"]["accuracy"]
