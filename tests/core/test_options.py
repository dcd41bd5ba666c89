"""Option resolution: defaults < registry.yaml < flags."""

from __future__ import annotations

import pytest

from tests.helpers import make_registry
from vlrouter.core.errors import InputError
from vlrouter.core.options import resolve_options
from vlrouter.core.registry import Registry, TrainSection

BASE = "Qwen/Qwen3-VL-8B-Instruct"


def test_options_resolve_defaults_then_registry_then_flags(tmp_path):
    path = make_registry(tmp_path, BASE, ["calendar", "claim-window"], n=2, epochs=7, lr=0.5)
    reg = Registry.load(path)
    o = resolve_options(reg, {})
    assert (o.epochs, o.lr, o.patience, o.base_model) == (7, 0.5, 8, BASE)  # registry over defaults
    assert o.val_fraction == TrainSection().val_fraction  # default where the registry is silent
    o = resolve_options(reg, {"epochs": 3, "lr": None, "base_model_id": "Qwen/Other", "train_samples": 9})
    assert (o.epochs, o.lr, o.base_model, o.train_samples) == (3, 0.5, "Qwen/Other", 9)  # flags over registry
    with pytest.raises(InputError, match="epoch: unknown training option; did you mean 'epochs'"):
        resolve_options(reg, {"epoch": 3})
    with pytest.raises(InputError, match="epochs"):
        resolve_options(reg, {"epochs": 0})


def test_the_solver_is_lbfgs_unless_the_seeds_minibatch_settings_are_given(tmp_path):
    from tests.helpers import DEFAULTS

    path = make_registry(tmp_path, BASE, ["calendar", "claim-window"], n=2, **DEFAULTS)
    reg = Registry.load(path)
    o = resolve_options(reg, {})
    assert o.solver == "lbfgs" and "L-BFGS" in o.solver_reason
    assert resolve_options(reg, {"epochs": 50}).solver == "lbfgs"  # --epochs caps L-BFGS iterations
    o = resolve_options(reg, {"lr": 1e-4, "patience": 5})
    assert o.solver == "adamw" and "--lr, --patience given" in o.solver_reason  # the seed's flags mean what they say
    path.write_text(path.read_text().replace("train:\n", "train:\n  batch_size: 8\n"))
    assert resolve_options(Registry.load(path), {}).solver == "adamw"  # in registry.yaml too
    path.write_text(path.read_text().replace("train:\n", "train:\n  solver: lbfgs\n"))
    assert resolve_options(Registry.load(path), {"lr": 0.1}).solver == "lbfgs"  # an explicit solver wins
    path.write_text(path.read_text().replace("  solver: lbfgs\n", "  head: mlp\n"))
    assert resolve_options(Registry.load(path), {}).solver == "adamw"


def test_a_local_base_model_flag_becomes_absolute_and_other_flags_stay_as_given(tmp_path, monkeypatch):
    path = make_registry(tmp_path / "proj", BASE, ["calendar", "claim-window"], n=2)
    reg = Registry.load(path)
    (tmp_path / "models" / "qwen").mkdir(parents=True)
    (tmp_path / "cpu").mkdir()  # a folder that happens to share a flag value's name
    monkeypatch.chdir(tmp_path)
    o = resolve_options(reg, {"base_model_id": "models/qwen", "device": "cpu"})
    assert o.base_model == str(tmp_path / "models" / "qwen")  # later commands run elsewhere still find it
    assert o.device == "cpu"
    assert resolve_options(reg, {"base_model_id": "Qwen/Other"}).base_model == "Qwen/Other"  # a hub id: untouched


def test_the_worker_count_says_where_it_came_from(tmp_path):
    from vlrouter.core.options import auto_workers

    reg = Registry.load(make_registry(tmp_path, BASE, ["calendar", "claim-window"], n=2, workers=2))
    o = resolve_options(reg, {})
    assert (o.workers, o.workers_note) == (2, "set by train.workers")
    o = resolve_options(reg, {"workers": 3})
    assert (o.workers, o.workers_note) == (3, "set by --workers")
    o = resolve_options(reg, {"workers": "auto"})
    assert (o.workers, o.workers_note) == auto_workers()
