"""The engine's serving entry points: forced adapters, and reloading a promoted router in place."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: engine_helpers
import engine_helpers as H

from vlrouter.core.engine import Engine
from vlrouter.core.errors import ModelLoadError, StaleRouterError, UnknownAdapterError

MAX_NEW = 6


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, tiny_encoder):
    """A project with the three adapters, plus a fourth LoRA checkpoint not registered yet."""
    root = tmp_path_factory.mktemp("reload-project")
    H.make_project(root, tiny_model_dir, encoder=tiny_encoder)
    H.make_lora_adapters(tiny_model_dir, root / "checkpoints", ["settings-toggle"], seed=7)
    return root


@pytest.fixture
def project(built, tmp_path):
    """A private copy of the project (reload tests promote routers and edit registry.yaml)."""
    root = tmp_path / "p"
    shutil.copytree(built, root, symlinks=True)
    return root / "registry.yaml"


@pytest.fixture(scope="module")
def engine(built):
    return Engine.from_registry(built / "registry.yaml", device="cpu")


@pytest.fixture(scope="module")
def items():
    return [(img, prompt) for img, prompt, _ in H.samples()]


CKS = {n: f"checkpoints/{n}" for n in H.NAMES}


# ---- forced adapters -----------------------------------------------------------------------

def test_a_forced_adapter_generates_with_it_without_routing(engine, items, monkeypatch):
    img, prompt = items[0]  # routes to calendar
    routed = engine.act(img, prompt, max_new_tokens=MAX_NEW)
    calls = []
    monkeypatch.setattr(engine, "_features", lambda *a, **k: calls.append(1) or pytest.fail("routing ran"))
    forced = engine.act(img, prompt, max_new_tokens=MAX_NEW, adapter="provider-select")
    same = engine.act(img, prompt, max_new_tokens=MAX_NEW, adapter=routed.adapter)
    base = engine.act(img, prompt, max_new_tokens=MAX_NEW, adapter="base")
    monkeypatch.undo()
    assert (forced.adapter, forced.routed, forced.fallback, forced.probs) == ("provider-select", "provider-select",
                                                                              False, {})
    assert forced.confidence == 1.0 and not calls
    assert same.text == routed.text  # forcing the routed adapter changes nothing but the routing pass
    assert forced.text != routed.text or base.text != routed.text  # a different adapter really generated
    assert base.adapter == "base" and forced.timings["vision_calls"] == 1


def test_forced_rows_in_a_batch_equal_forced_single_acts(engine, items):
    forced = [None, "base", "claim-window", None, "calendar", "provider-select"]
    batch = engine.act_batch(items, max_new_tokens=MAX_NEW, adapters=forced)
    single = [engine.act(i, p, max_new_tokens=MAX_NEW, adapter=f) for (i, p), f in zip(items, forced)]
    assert [(a.adapter, a.routed, a.text) for a in batch] == [(a.adapter, a.routed, a.text) for a in single]
    assert [a.probs == {} for a in batch] == [f is not None for f in forced]


def test_an_unknown_forced_adapter_is_refused_naming_the_known_ones(engine, items):
    with pytest.raises(UnknownAdapterError, match=r"unknown adapter 'calender' \(fix: one of base, calendar"):
        engine.act(*items[0], adapter="calender")
    with pytest.raises(UnknownAdapterError):
        engine.act_batch(items[:2], adapters=[None, "nope"])
    with pytest.raises(Exception, match="one entry per item"):
        engine.act_batch(items[:2], adapters=["base"])


# ---- reload ---------------------------------------------------------------------------------

def test_reload_after_add_adapter_loads_the_new_lora_into_the_running_model(project, items, tiny_encoder):
    engine = Engine.from_registry(project, device="cpu")
    model_id = id(engine.model)
    old_version = engine.router_version
    H.promote_router(project, {**CKS, "settings-toggle": "checkpoints/settings-toggle"}, encoder=tiny_encoder)
    result = engine.reload()
    assert result.added == ["settings-toggle"] and result.removed == [] and result.replaced == []
    assert engine.adapters == [*H.NAMES, "settings-toggle"] and id(engine.model) == model_id
    assert engine.router_version != old_version and result.router == engine.router_version
    fresh = Engine.from_registry(project, device="cpu")  # what a restart would give
    for img, prompt in items + [(H.screen("settings-toggle"), "Do the settings-toggle task")]:
        a, b = engine.act(img, prompt, max_new_tokens=MAX_NEW), fresh.act(img, prompt, max_new_tokens=MAX_NEW)
        assert (a.adapter, a.text) == (b.adapter, b.text)
        assert a.probs == pytest.approx(b.probs, abs=1e-5)
    forced = engine.act(*items[0], max_new_tokens=MAX_NEW, adapter="settings-toggle")
    assert forced.text == fresh.act(*items[0], max_new_tokens=MAX_NEW, adapter="settings-toggle").text


def test_reload_after_remove_adapter_drops_its_lora(project, items, tiny_encoder):
    engine = Engine.from_registry(project, device="cpu")
    H.promote_router(project, {n: CKS[n] for n in ("calendar", "provider-select")}, encoder=tiny_encoder)
    result = engine.reload()
    assert result.removed == ["claim-window"] and result.added == []
    assert "claim-window" not in engine.model.peft_config and engine.adapters == ["calendar", "provider-select"]
    assert {engine.act(i, p, max_new_tokens=2).adapter for i, p in items} <= {"calendar", "provider-select"}
    assert engine.pool.known == {"calendar", "provider-select"}  # forgotten, not just unloaded
    H.promote_router(project, CKS, encoder=tiny_encoder)  # and back: a new adapter again, loaded at once
    result = engine.reload()
    assert result.added == ["claim-window"] and "claim-window" in engine.model.peft_config


def test_a_checkpoint_rewritten_under_the_same_name_is_reloaded(project, items, tiny_model_dir, tiny_encoder):
    engine = Engine.from_registry(project, device="cpu")
    before = engine.act(*items[2], max_new_tokens=MAX_NEW, adapter="claim-window").text
    root = project.parent
    shutil.rmtree(root / "checkpoints" / "claim-window")
    H.make_lora_adapters(tiny_model_dir, root / "checkpoints", ["claim-window"], seed=99)
    H.promote_router(project, CKS, encoder=tiny_encoder)
    assert engine.reload().replaced == ["claim-window"]
    assert "claim-window" in engine.model.peft_config and engine.pool.loads == 0  # reloaded now, not on first use
    after = engine.act(*items[2], max_new_tokens=MAX_NEW, adapter="claim-window").text
    assert after == Engine.from_registry(project, device="cpu").act(*items[2], max_new_tokens=MAX_NEW,
                                                                    adapter="claim-window").text
    assert after != before


def test_a_router_promoted_before_the_registry_is_saved_is_stale_and_the_old_one_keeps_serving(project, items,
                                                                                             tiny_encoder):
    engine = Engine.from_registry(project, device="cpu")
    expected = engine.act(*items[0], max_new_tokens=MAX_NEW)
    H.promote_router(project, {**CKS, "settings-toggle": "checkpoints/settings-toggle"}, encoder=tiny_encoder,
                     update_registry=False)  # add-adapter between its promotion and its registry save
    with pytest.raises(StaleRouterError, match="adapter set differs"):
        engine.reload()
    assert engine.adapters == H.NAMES and "settings-toggle" not in engine.model.peft_config
    assert engine.act(*items[0], max_new_tokens=MAX_NEW).text == expected.text


def test_a_new_adapter_that_does_not_fit_is_refused_and_nothing_changes(project, items, tiny_encoder, tmp_path):
    from vlrouter.core.tiny import TinySpec, build_tiny_model

    engine = Engine.from_registry(project, device="cpu")
    expected = engine.act(*items[0], max_new_tokens=MAX_NEW)
    H.promote_router(project, {**CKS, "settings-toggle": "checkpoints/settings-toggle"}, encoder=tiny_encoder)
    other = build_tiny_model(tmp_path / "other", TinySpec(hidden_size=32, heads=2, kv_heads=1, intermediate_size=64))
    shutil.rmtree(project.parent / "checkpoints" / "settings-toggle")  # the new adapter: made for another model
    H.make_lora_adapters(other, project.parent / "checkpoints", ["settings-toggle"])
    with pytest.raises(ModelLoadError, match="'settings-toggle'.*does not fit the base model"):
        engine.reload(check_base_model=False)
    assert set(engine.model.peft_config) == set(H.NAMES) and engine.adapters == H.NAMES
    assert engine.act(*items[0], max_new_tokens=MAX_NEW).text == expected.text


def test_a_reload_waits_for_the_call_in_flight(project, items, tiny_encoder):
    engine = Engine.from_registry(project, device="cpu")
    H.promote_router(project, {**CKS, "settings-toggle": "checkpoints/settings-toggle"}, encoder=tiny_encoder)
    done = threading.Event()
    with engine.lock:  # a call in flight holds the model lock
        t = threading.Thread(target=lambda: (engine.reload(), done.set()))
        t.start()
        time.sleep(0.5)
        assert not done.is_set() and engine.adapters == H.NAMES  # the in-flight call still sees the old router
    t.join(timeout=60)
    assert done.is_set() and "settings-toggle" in engine.adapters


def _set_router_base_model(project: Path, base_model: str) -> None:
    """registry.yaml's base_model and the live router.json's, both set to ``base_model`` (not stale)."""
    import json

    from vlrouter.core.registry import Registry

    reg = Registry.load(project)
    project.write_text(project.read_text().replace(f"base_model: {reg.model.base_model}\n",
                                                   f"base_model: {base_model}\n"))
    meta_path = Path(reg.router_dir) / "router.json"
    meta = json.loads(meta_path.read_text())
    meta["base_model"] = base_model
    meta_path.write_text(json.dumps(meta))


def test_a_reload_naming_the_running_base_model_by_another_path_is_accepted(project, tiny_model_dir):
    engine = Engine.from_registry(project, device="cpu")
    link = project.parent / "models" / "tiny"
    link.parent.mkdir()
    link.symlink_to(tiny_model_dir)  # the same folder under another name
    _set_router_base_model(project, str(link))
    result = engine.reload()
    assert result.added == result.removed == result.replaced == [] and engine.adapters == H.NAMES


def test_a_reload_naming_another_base_model_is_refused(project, tmp_path):
    engine = Engine.from_registry(project, device="cpu")
    other = tmp_path / "other-model"
    other.mkdir()  # exists, but it is not the folder the engine runs
    _set_router_base_model(project, str(other))
    with pytest.raises(ModelLoadError, match="base_model changed from .* a running engine cannot swap its base model"):
        engine.reload()
    assert engine.adapters == H.NAMES


def test_a_reload_checks_a_new_adapters_base_model(project, items, tiny_encoder):
    import json

    engine = Engine.from_registry(project, device="cpu")
    H.promote_router(project, {**CKS, "settings-toggle": "checkpoints/settings-toggle"}, encoder=tiny_encoder)
    cfg_path = project.parent / "checkpoints" / "settings-toggle" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen3-VL-2B-Instruct"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"'settings-toggle'.*made for base model 'Qwen/Qwen3-VL-2B-Instruct'"):
        engine.reload()
    assert engine.adapters == H.NAMES and "settings-toggle" not in engine.model.peft_config
    assert engine.reload(check_base_model=False).added == ["settings-toggle"]  # the escape hatch, as at load


def test_a_reload_applies_the_registrys_min_confidence_and_ood_setting(project, monkeypatch):
    import dataclasses

    from vlrouter.core import engine as engine_mod

    engine = Engine.from_registry(project, device="cpu")
    assert engine.min_confidence == 0.0 and engine.ood is None
    stats = object()  # stands for a router's OOD statistics (the test routers are trained without them)
    real = engine_mod.read_router
    monkeypatch.setattr(engine_mod, "read_router", lambda d: dataclasses.replace(real(d), ood=stats))
    project.write_text(project.read_text().replace("min_confidence: 0.0", "min_confidence: 0.5"))
    engine.reload()
    assert engine.min_confidence == 0.5 and engine.ood is stats  # router.ood: auto (the default) uses them
    project.write_text(project.read_text().replace("router:\n", "router:\n  ood: off\n"))
    engine.reload()
    assert engine.ood is None and engine.min_confidence == 0.5


def test_a_swap_that_fails_its_checks_unloads_the_adapters_it_loaded(project):
    from vlrouter.core.errors import InputError
    from vlrouter.core.lora import AdapterSource

    engine = Engine.from_registry(project, device="cpu")
    names = [*H.NAMES, "settings-toggle"]
    sources = [AdapterSource(n, project.parent / "checkpoints" / n) for n in names]
    bad = engine.meta.model_copy(update={"adapters": names, "temperature": 0.0})  # refused after the loads
    with pytest.raises(InputError, match="temperature"):
        engine.swap_router(engine.head, bad, sources)
    assert set(engine.model.peft_config) == set(H.NAMES) and engine.pool.known == set(H.NAMES)
    assert engine.adapters == H.NAMES
