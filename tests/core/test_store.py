"""The router store: the eval gate (live router read once, scored on the same samples), promotion, the lock."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import make_registry
from vlrouter.backends.local import retrain_local
from vlrouter.core.errors import CheckpointError, LockHeldError, PromotionRefused, StaleRouterError
from vlrouter.core.gate import promote_with_gate
from vlrouter.core.head import HeadShape, build_head
from vlrouter.core.options import resolve_options
from vlrouter.core.recipe import run_retrain
from vlrouter.core.registry import Registry
from vlrouter.core.store import (
    KEEP_VERSIONS,
    RouterLock,
    RouterMeta,
    load_router,
    new_version_dir,
    promote,
    read_meta,
    save_router,
    versions_dir,
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
    meta = RouterMeta(adapters=list(adapters), base_model=BASE, pooling=["mean"], layer=2, num_layers=2, hidden_size=4,
                      head=shape, metrics={"val_acc": acc, "n_val": 48}, encoder_fingerprint=fp)
    return save_router(new_version_dir(live), head, meta)


# 48 validation samples: 42 of class 0, 6 of class 1. A head that always says 0 scores 0.875.
# Feature 0 is -2 for class 0 and +2 for class 1 (what a head that beats chance reads).
VAL_Y = [0] * 42 + [1] * 6
_X = torch.randn(48, 4, generator=torch.Generator().manual_seed(0))
_X[:, 0] = torch.tensor([-2.0 if y == 0 else 2.0 for y in VAL_Y])
VAL_X = {"mean@2": _X}  # every view this run embedded: the candidates read mean@2


def _snapshot(live: Path) -> tuple:
    return os.readlink(live), (live / "router.json").read_bytes(), (live / "head.safetensors").read_bytes()


def test_gate_refuses_a_worse_candidate_with_both_numbers_and_force_promotes(tmp_path):
    live = tmp_path / "runs" / "router"
    promote(_router(live, acc=0.875, bias=0), live)  # scores 0.875 on VAL
    before = _snapshot(live)
    worse = _router(live, acc=0.8125)
    with pytest.raises(PromotionRefused) as e:
        promote_with_gate(worse, live, val_views=VAL_X, val_labels=VAL_Y, force=False)
    msg = str(e.value)
    assert "new router 0.812 < live 0.875 on the same 48 validation samples" in msg
    assert "kept the live router" in msg and "--force" in msg
    assert _snapshot(live) == before
    decision = promote_with_gate(worse, live, val_views=VAL_X, val_labels=VAL_Y, force=True)
    assert decision.promoted and "--force" in decision.message
    assert os.path.realpath(live) == os.path.realpath(worse)


def test_gate_promotes_equal_or_better_and_other_label_sets(tmp_path):
    live = tmp_path / "router"
    promote(_router(live, acc=0.5, bias=1), live)  # scores 0.125 on VAL
    d = promote_with_gate(_router(live, acc=0.125), live, val_views=VAL_X, val_labels=VAL_Y)
    assert d.promoted and d.live_val_acc == 0.125  # a tie promotes
    d = promote_with_gate(_router(live, acc=0.1, adapters=("a", "b", "c")), live, val_views=VAL_X, val_labels=VAL_Y)
    assert d.promoted and "other labels" in d.message  # not comparable: a new label set
    d = promote_with_gate(_router(live, acc=0.05, adapters=("a", "b", "c"), fp="enc2"), live, val_views=VAL_X,
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


def test_the_gate_scores_a_live_router_in_its_own_representation_or_says_it_cannot(tmp_path):
    live = tmp_path / "router"
    shape = HeadShape(in_dim=4, num_labels=2)
    head = build_head(shape)
    with torch.no_grad():
        head[-1].weight.zero_()
        head[-1].bias.copy_(torch.tensor([1.0, 0.0]))  # always "a": 0.875 on VAL_Y
    meta = RouterMeta(adapters=["a", "b"], base_model=BASE, pooling=["last"], layer=1, num_layers=2, hidden_size=4,
                      head=shape, metrics={"val_acc": 0.9, "n_val": 48}, encoder_fingerprint="enc1")
    promote(save_router(new_version_dir(live), head, meta), live)
    both = {**VAL_X, "last@1": torch.zeros(48, 4)}  # the live router reads last@1
    with pytest.raises(PromotionRefused, match="live 0.875"):  # scored on last@1, which this run embedded
        promote_with_gate(_router(live, acc=0.5), live, val_views=both, val_labels=VAL_Y)
    d = promote_with_gate(_router(live, acc=0.5), live, val_views=VAL_X, val_labels=VAL_Y)
    assert d.promoted and d.live_val_acc is None and "last @ layer 1, which this run did not embed" in d.message


# ---- hardening (issue #12) ------------------------------------------------------------------

def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("what", ["notes-folder", "registry-yaml", "project-folder", "dataset-file"])
def test_router_dir_naming_something_else_is_refused_and_nothing_moves(tmp_path, what):
    """router.dir over a user's files: refused, never moved into the versions folder (and later pruned)."""
    path = make_registry(tmp_path, BASE, ["calendar", "claim-window"], n=2)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.md").write_text("keep me")
    target = {"notes-folder": tmp_path / "notes", "registry-yaml": path, "project-folder": tmp_path,
              "dataset-file": tmp_path / "data" / "calendar" / "train.jsonl"}[what]
    cand = _router(tmp_path / "elsewhere" / "router", acc=0.9)
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError) as e:
        promote(cand, target)
    assert "router.dir" in str(e.value) and "(fix: set router.dir" in str(e.value)
    with pytest.raises(CheckpointError):
        RouterLock(target)  # a retrain stops before it starts
    assert _tree(tmp_path) == before and not target.is_symlink()


def test_a_plain_router_folder_is_still_adopted(tmp_path):
    live = tmp_path / "router"
    old = _router(tmp_path / "x" / "router", acc=0.5)
    shutil.copytree(old, live)  # an older layout: a plain folder holding a router
    promote(_router(live, acc=0.9), live)
    assert live.is_symlink() and read_meta(live).metrics["val_acc"] == 0.9
    assert any(read_meta(v).metrics["val_acc"] == 0.5 for v in versions_dir(live).iterdir())


@pytest.mark.parametrize("case", ["at-chance", "nan-loss"])
def test_the_gate_never_promotes_a_router_at_chance_or_with_nan_even_with_force(tmp_path, case):
    live = tmp_path / "router"
    cand = _router(live, acc=0.875, bias=0)  # answers class 0 for everything: 0.875 accurate, chance balanced
    if case == "nan-loss":
        cand = _router(live, acc=0.9)
        meta = json.loads((cand / "router.json").read_text())
        (cand / "router.json").write_text(json.dumps({**meta, "best_loss": float("nan")}))
    with pytest.raises(PromotionRefused) as e:
        promote_with_gate(cand, live, val_views=VAL_X, val_labels=VAL_Y, force=True)
    assert ("does not beat chance 0.500" if case == "at-chance" else "best_loss is nan: training diverged") \
        in str(e.value)
    assert "not even with --force" in str(e.value) and not live.exists()


@pytest.mark.parametrize("damage,problem", [
    (lambda d: _edit(d, temperature=float("nan")), "temperature: invalid router.json"),
    (lambda d: _edit(d, temperature=1e-300), "temperature: invalid router.json"),
    (lambda d: _edit(d, temperature=float("inf")), "temperature: invalid router.json"),
    (lambda d: _edit_head(d, "1.weight", float("nan")), "1.weight: 8 NaN/inf values"),
    (lambda d: _edit_head(d, "0.std", 0.0), "0.std: 4 zero or negative values in the standardizer's std"),
    (lambda d: _edit(d, head={"kind": "linear", "in_dim": 100_000, "num_labels": 5000}, hidden_size=100_000),
     "over the limit of 100,000,000"),
    (lambda d: _edit(d, head={"kind": "linear", "in_dim": 60_000, "num_labels": 1000}, hidden_size=60_000,
                     adapters=[f"a{i}" for i in range(1000)]),
     "weights do not match router.json's head shape"),  # 60M floats claimed, 240 MB if allocated first
], ids=["nan-temperature", "tiny-temperature", "inf-temperature", "nan-weights", "zero-std", "absurd-head",
        "big-head-not-in-file"])
def test_a_router_that_would_route_silently_wrong_is_a_checkpoint_error(tmp_path, damage, problem):
    import resource

    d = _router(tmp_path / "router", acc=0.9)
    damage(d)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError) as e:
        load_router(d)
    assert problem in str(e.value) and "(fix: " in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100_000  # KiB: nothing allocated first


def _edit(d: Path, **changes) -> None:
    meta = json.loads((d / "router.json").read_text())
    (d / "router.json").write_text(json.dumps({**meta, **changes}))


def _edit_head(d: Path, name: str, value: float) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "head.safetensors"))
    state[name] = torch.full_like(state[name], value)
    save_file(state, str(d / "head.safetensors"))


def test_pruning_keeps_the_newest_versions_even_within_one_second(tmp_path):
    live = tmp_path / "router"
    made = []
    for i in range(6):
        if i == 4:
            crashed = new_version_dir(live)  # a candidate a crash left without router.json
        made.append(_router(live, acc=0.5 + i / 100))
        promote(made[-1], live)
    assert not crashed.exists()  # removed once older than a promoted version
    kept = sorted(p.name for p in versions_dir(live).iterdir())
    assert kept == sorted(p.name for p in made[-KEEP_VERSIONS:])  # the last three, in order
    assert KEEP_VERSIONS == 3  # README: "The three newest complete versions are kept"
    assert os.path.realpath(live) == str(made[-1])


def test_changed_base_weights_make_the_router_stale(tmp_path, tiny_model_dir):
    from vlrouter.core.encoder import model_fingerprint
    from vlrouter.core.status import router_state
    from vlrouter.core.store import check_router_for

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    path = make_registry(tmp_path, model, ["calendar", "claim-window"], n=2)
    reg = Registry.load(path)
    cand = _router(reg.router_dir, acc=0.9, adapters=("calendar", "claim-window"))
    _edit(cand, base_model=str(model), model_fingerprint=model_fingerprint(str(model)))
    promote(cand, reg.router_dir)
    assert router_state(reg)["state"] == "ok"
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten in place
    state = router_state(reg)
    assert state["state"] == "stale" and "the base model's weights changed since it was trained" in state["reason"]
    with pytest.raises(StaleRouterError, match="model_fingerprint: stale router"):
        check_router_for(read_meta(reg.router_dir), reg)


def test_the_chance_gate_needs_more_than_a_rounding_error_above_chance(tmp_path):
    # no validation features given: the gate reads router.json's val_acc; two adapters, chance 0.5
    live = tmp_path / "router"
    at_tolerance = _router(live, acc=0.5 + 1e-9)
    with pytest.raises(PromotionRefused, match="does not beat chance 0.500"):
        promote_with_gate(at_tolerance, live, force=True)
    assert not live.exists()
    above = _router(live, acc=0.5 + 2e-9)
    promote_with_gate(above, live)
    assert read_meta(live).metrics["val_acc"] == 0.5 + 2e-9


def test_a_temperature_above_the_limit_is_damage_and_the_message_names_the_range(tmp_path):
    d = _router(tmp_path / "router", acc=0.9)
    _edit(d, temperature=1000.0)
    assert load_router(d)[1].temperature == 1000.0  # the upper limit itself still loads
    _edit(d, temperature=1500.0)
    with pytest.raises(CheckpointError) as e:
        load_router(d)
    assert "temperature 1500.0 is not a finite number between 0.001 and 1000" in str(e.value)


def test_a_router_json_over_64_mib_is_refused_before_it_is_read(tmp_path):
    d = _router(tmp_path / "router", acc=0.9)
    with open(d / "router.json", "r+b") as f:
        f.truncate((64 << 20) + 1)  # sparse: no disk used
    with pytest.raises(CheckpointError) as e:
        read_meta(d)
    assert "67,108,865 bytes is too large for a router.json" in str(e.value) and "(fix: retrain" in str(e.value)


@pytest.mark.parametrize("entries,what", [([], "it is empty"), (["tensorboard"], "it holds no router.json")])
def test_router_dir_naming_an_empty_or_metaless_folder_is_refused(tmp_path, entries, what):
    live = tmp_path / "router"
    live.mkdir()
    for name in entries:
        (live / name).mkdir()
    cand = _router(tmp_path / "elsewhere" / "router", acc=0.9)
    with pytest.raises(CheckpointError) as e:
        promote(cand, live)
    assert f"names an existing folder that is not a router ({what})" in str(e.value)
    assert live.is_dir() and not live.is_symlink() and sorted(p.name for p in live.iterdir()) == entries


def test_a_relative_base_model_in_router_json_resolves_against_the_registry_folder(tmp_path, monkeypatch):
    from vlrouter.core.store import same_base_model

    project = tmp_path / "project"
    (project / "model").mkdir(parents=True)
    reg = Registry.load(make_registry(project, "model", ["calendar"], n=2))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert same_base_model("./model", reg)  # written differently, the same folder beside registry.yaml
    assert not same_base_model("./other", reg)


def test_an_adapter_edit_keeps_a_better_live_router_unless_forced_and_saves_the_registry_only_after(tmp_path):
    from vlrouter.core.recipe import Candidate, edit_adapters

    path = make_registry(tmp_path, BASE, ["calendar", "claim-window", "provider-select"], n=3)
    reg = Registry.load(path)
    names = ("calendar", "claim-window")  # the live router predates adding provider-select without a retrain
    promote(_router(reg.router_dir, acc=0.875, adapters=names, bias=0), reg.router_dir)  # scores 0.875 on VAL
    live, before = _snapshot(reg.router_dir), path.read_bytes()
    worse = _router(reg.router_dir, acc=0.8125, adapters=names)

    def backend(request):
        return Candidate(dir=worse, dataset_dir=tmp_path, meta=read_meta(worse), val_views=VAL_X, val_labels=VAL_Y)

    edited = reg.remove_adapter("provider-select")
    with pytest.raises(PromotionRefused, match="new router 0.812 < live 0.875"):
        edit_adapters(edited, backend=backend)  # the gate applies unless asked otherwise
    with pytest.raises(PromotionRefused, match="new router 0.812 < live 0.875"):
        run_retrain(edited, resolve_options(edited), backend)  # `router retrain` without --force: the same
    assert _snapshot(reg.router_dir) == live and path.read_bytes() == before  # registry.yaml not written either
    result = edit_adapters(edited, backend=backend, force=True)
    assert result.promoted and os.path.realpath(reg.router_dir) == os.path.realpath(worse)
    assert Registry.load(path).adapter_names == list(names)


def test_a_router_trained_on_a_hub_model_matches_the_registry_naming_that_id(tmp_path):
    from vlrouter.core.store import same_base_model

    reg = Registry.load(make_registry(tmp_path, BASE, ["calendar", "claim-window"], n=2))
    assert same_base_model(BASE, reg) and same_base_model(BASE, reg, "0123456789abcdef")  # no local folder to check
    assert not same_base_model("Qwen/Qwen3-VL-2B-Instruct", reg)


def test_a_router_for_other_adapters_is_stale_for_the_registry(tmp_path):
    from vlrouter.core.store import check_router_for

    reg = Registry.load(make_registry(tmp_path, BASE, ["calendar", "claim-window", "provider-select"], n=2))
    promote(_router(reg.router_dir, acc=0.9, adapters=("calendar", "claim-window")), reg.router_dir)
    with pytest.raises(StaleRouterError, match=r"adapters: stale router: the adapter set differs"):
        check_router_for(read_meta(reg.router_dir), reg)


def test_a_router_for_another_base_model_is_stale_and_the_same_one_is_not(tmp_path):
    from vlrouter.core.store import check_router_for

    reg = Registry.load(make_registry(tmp_path, BASE, ["calendar", "claim-window"], n=2))
    promote(_router(reg.router_dir, acc=0.9, adapters=("calendar", "claim-window")), reg.router_dir)
    meta = read_meta(reg.router_dir)
    check_router_for(meta, reg)  # trained on the registry's base model: fine
    other = meta.model_copy(update={"base_model": "Qwen/Qwen3-VL-2B-Instruct"})
    with pytest.raises(StaleRouterError, match="base_model: stale router: trained on 'Qwen/Qwen3-VL-2B-Instruct'"):
        check_router_for(other, reg)


def test_a_plain_router_folder_with_a_leftover_temporary_router_json_is_still_adopted(tmp_path):
    live = tmp_path / "router"
    shutil.copytree(_router(tmp_path / "old", acc=0.9), live)  # the older layout: a plain folder
    (live / ".router.json.tmp-1234").write_text("{")  # what an interrupted atomic write leaves
    promote(_router(live, acc=0.95), live)
    assert live.is_symlink() and read_meta(live).metrics["val_acc"] == 0.95


def test_router_dir_as_a_symlink_is_replaced_only_when_it_points_at_a_router_or_nothing(tmp_path):
    import os

    cand = _router(tmp_path / "elsewhere" / "router", acc=0.9)
    notes = tmp_path / "notes"  # a folder that is not a router version: the link stays, nothing moves
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    live = tmp_path / "router"
    os.symlink(notes, live)
    with pytest.raises(CheckpointError, match=r"router.dir: is a symlink to .*notes, which is not a router version"):
        promote(cand, live)
    assert os.readlink(live) == str(notes) and (notes / "todo.txt").read_text() == "keep me"
    for target in (tmp_path / "gone", cand):  # dangling (a version pruned by hand), or a router folder: replaced
        live.unlink()
        os.symlink(target, live)
        promote(cand, live)
        assert live.is_symlink() and read_meta(live).metrics["val_acc"] == 0.9


def test_router_train_keeps_a_better_live_router_unless_forced(tmp_path, monkeypatch):
    from vlrouter.core import recipe
    from vlrouter.core.data import build_routing_dataset

    names = ("calendar", "claim-window")
    reg = Registry.load(make_registry(tmp_path, BASE, list(names), n=3))
    build_routing_dataset(reg, reg.resolve("datasets"), seed=0)
    promote(_router(reg.router_dir, acc=0.875, adapters=names, bias=0), reg.router_dir)  # scores 0.875 on VAL
    worse = _router(reg.router_dir, acc=0.8125, adapters=names)
    monkeypatch.setattr(recipe, "train_candidate", lambda *a, **kw: recipe.Candidate(
        dir=worse, dataset_dir=tmp_path, meta=read_meta(worse), val_views=VAL_X, val_labels=VAL_Y))
    opts = resolve_options(reg)
    with pytest.raises(PromotionRefused, match="new router 0.812 < live 0.875"):
        recipe.run_train(reg, opts)
    assert recipe.run_train(reg, opts, force=True).promoted


def test_a_candidate_for_other_adapters_is_refused_before_the_gate_and_the_live_router_stays(tmp_path):
    from vlrouter.core.errors import DatasetError
    from vlrouter.core.recipe import Candidate

    reg = Registry.load(make_registry(tmp_path, BASE, ["calendar", "claim-window"], n=2))
    promote(_router(reg.router_dir, acc=0.875, adapters=("calendar", "claim-window"), bias=0), reg.router_dir)
    live = _snapshot(reg.router_dir)
    other = _router(reg.router_dir, acc=0.95, adapters=("a", "b"))  # a backend that trained for another registry

    def backend(request):
        return Candidate(dir=other, dataset_dir=tmp_path, meta=read_meta(other), val_views=VAL_X, val_labels=VAL_Y)

    with pytest.raises(DatasetError, match=r"class_names: built for adapters \['a', 'b'\], but the registry lists "
                                           r"\['calendar', 'claim-window'\]"):
        run_retrain(reg, resolve_options(reg), backend, force=True)
    assert _snapshot(reg.router_dir) == live


def test_router_train_refuses_a_dataset_built_for_other_adapters_before_training(tmp_path, monkeypatch):
    from vlrouter.core import recipe
    from vlrouter.core.data import build_routing_dataset
    from vlrouter.core.errors import DatasetError

    three = Registry.load(make_registry(tmp_path, BASE, ["calendar", "claim-window", "provider-select"], n=3))
    ds = build_routing_dataset(three, three.resolve("datasets"), seed=0)
    two = Registry.load(make_registry(tmp_path, BASE, ["calendar", "claim-window"], n=3))  # provider-select removed
    monkeypatch.setattr(recipe, "train_candidate", lambda *a, **kw: pytest.fail("trained on the old dataset"))
    with pytest.raises(DatasetError, match=rf"{ds / 'metadata.json'}: class_names: built for adapters "
                                           r"\['calendar', 'claim-window', 'provider-select'\]"):
        recipe.run_train(two, resolve_options(two))
