"""engine.max_loaded_adapters: at most N LoRAs in the model, others loaded on first use; answers as all resident."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: engine_helpers
import engine_helpers as H

from vlrouter.core import residency
from vlrouter.core.engine import Engine
from vlrouter.core.errors import ModelLoadError, UnknownAdapterError

NAMES = [f"task-{i:02d}" for i in range(12)]
CAP = 3
MAX_NEW = 5


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, tiny_encoder):
    """12 LoRAs + a router over them; registry.yaml (all resident) and capped.yaml (max_loaded_adapters: 3)."""
    root = tmp_path_factory.mktemp("residency")
    reg = H.make_project(root, tiny_model_dir, names=NAMES, encoder=tiny_encoder)
    H.make_lora_adapters(tiny_model_dir, root / "checkpoints", ["task-12"], seed=99)
    capped = root / "capped.yaml"
    capped.write_text(reg.read_text() + f"engine:\n  max_loaded_adapters: {CAP}\n")
    return reg, capped


@pytest.fixture(scope="module")
def full(built):
    return Engine.from_registry(built[0], device="cpu")


@pytest.fixture(scope="module")
def items():
    return [(img, prompt) for img, prompt, _ in H.samples(NAMES)]


def _lora_adapters_in(model) -> set[str]:
    """Adapters that have LoRA parameters in the model right now (not just a config entry)."""
    found = set()
    for name, _ in model.named_parameters():
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in ("lora_A", "lora_B"):
                found.add(parts[i + 1])
    return found


@pytest.fixture
def watched(monkeypatch):
    """Every on-demand load is checked: the model never holds more than CAP LoRAs, not even for a moment."""
    seen = []
    real = residency.load_adapter

    def load(model, src):
        assert len(model.peft_config) < CAP, f"loading {src.name} with {list(model.peft_config)} resident"
        real(model, src)
        seen.append(src.name)
        assert len(model.peft_config) <= CAP and len(_lora_adapters_in(model)) <= CAP

    monkeypatch.setattr(residency, "load_adapter", load)
    return seen


def test_acts_cycling_through_twelve_adapters_with_three_loaded_equal_the_all_resident_engine(
        built, full, items, watched):
    capped = Engine.from_registry(built[1], device="cpu")
    assert capped.pool.capacity == CAP and capped.pool.resident == NAMES[:CAP]
    assert capped.adapters == full.adapters == NAMES  # the head still scores every adapter
    img, prompt = items[0]
    for _ in range(2):  # twice round: every adapter is evicted and loaded again
        for name in NAMES:
            a = capped.act(img, prompt, max_new_tokens=MAX_NEW, adapter=name)
            b = full.act(img, prompt, max_new_tokens=MAX_NEW, adapter=name)
            assert (a.adapter, a.text) == (b.adapter, b.text), name
            assert capped.pool.resident[-1] == name and len(capped.model.peft_config) <= CAP
            assert _lora_adapters_in(capped.model) == set(capped.pool.resident)
    for img, prompt in items:  # routed: the same decisions and texts
        a, b = capped.act(img, prompt, max_new_tokens=MAX_NEW), full.act(img, prompt, max_new_tokens=MAX_NEW)
        assert (a.adapter, a.confidence, a.text) == (b.adapter, b.confidence, b.text)
    assert len(set(watched)) == len(NAMES) and capped.pool.peak <= CAP
    assert capped.pool.evictions >= 2 * len(NAMES) - CAP
    assert capped.pool.loads == len(watched)  # the counter counts every on-demand load, the initial three not
    assert full.pool.loads == 0 and full.pool.evictions == 0
    assert capped.pool.vision_adapters() == frozenset()  # LM-only LoRAs loaded on demand stay off the vision list


def test_a_batch_naming_more_adapters_than_the_cap_runs_in_groups_with_the_same_texts(built, full, items, watched):
    capped = Engine.from_registry(built[1], device="cpu")
    rows = [items[i % len(items)] for i in range(len(NAMES))]
    forced = list(reversed(NAMES))  # 12 distinct adapters in one batch
    a = capped.act_batch(rows, max_new_tokens=MAX_NEW, adapters=forced)
    b = full.act_batch(rows, max_new_tokens=MAX_NEW, adapters=forced)
    assert [x.text for x in a] == [x.text for x in b]
    assert [x.adapter for x in a] == forced
    assert capped.pool.peak <= CAP and len(capped.model.peft_config) <= CAP
    mixed = ["base", *NAMES[:5], "base"]  # base rows ride with the first group
    a = capped.act_batch(rows[:7], max_new_tokens=MAX_NEW, adapters=mixed)
    b = full.act_batch(rows[:7], max_new_tokens=MAX_NEW, adapters=mixed)
    assert [x.text for x in a] == [x.text for x in b]


def test_groups_keep_resident_adapters_first_and_every_group_within_the_cap(built):
    capped = Engine.from_registry(built[1], device="cpu")
    pool = capped.pool
    assert pool.groups(["base", NAMES[0], NAMES[0]]) == [[0, 1, 2]]  # fits: one call
    chosen = [NAMES[5], "base", NAMES[0], NAMES[6], NAMES[1], NAMES[7], NAMES[5]]
    groups = pool.groups(chosen)
    assert sorted(i for g in groups for i in g) == list(range(len(chosen)))
    assert all(len({chosen[i] for i in g} - {"base"}) <= CAP for g in groups)
    assert {chosen[i] for i in groups[0]} == {"base", NAMES[0], NAMES[1], NAMES[5]}  # resident 0, 1 first
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'"):
        pool.ensure(["nope"])


def test_a_reload_under_the_cap_makes_new_adapters_known_not_resident(built, items, tmp_path, tiny_encoder, watched):
    root = tmp_path / "p"
    shutil.copytree(built[0].parent, root, symlinks=True)
    capped = root / "capped.yaml"
    engine = Engine.from_registry(capped, device="cpu")
    before = engine.pool.resident
    cks = {n: f"checkpoints/{n}" for n in [*NAMES, "task-12"]}
    H.promote_router(root / "registry.yaml", cks, encoder=tiny_encoder)
    capped.write_text((root / "registry.yaml").read_text() + f"engine:\n  max_loaded_adapters: {CAP}\n")
    result = engine.reload()
    assert result.added == ["task-12"] and "task-12" in engine.adapters
    assert engine.pool.resident == before and "task-12" not in engine.model.peft_config  # known, not loaded
    a = engine.act(*items[0], max_new_tokens=MAX_NEW, adapter="task-12")
    assert a.adapter == "task-12" and engine.pool.resident[-1] == "task-12"
    assert len(engine.model.peft_config) <= CAP


def test_an_adapter_whose_weights_vanished_before_first_use_is_a_located_error(built, items, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(built[0].parent, root, symlinks=True)
    engine = Engine.from_registry(root / "capped.yaml", device="cpu")
    victim = NAMES[-1]  # known, not resident
    weights = root / "checkpoints" / victim / "adapter_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))  # a pickle's name: never loaded
    with pytest.raises(ModelLoadError, match=rf"capped.yaml:\d+: adapters\[11\]\.checkpoint: adapter '{victim}' has "
                                             r"only .*adapter_model.bin \(a pickle"):
        engine.act(*items[0], max_new_tokens=MAX_NEW, adapter=victim)
    assert victim not in engine.model.peft_config and len(engine.model.peft_config) <= CAP
    assert engine.act(*items[0], max_new_tokens=MAX_NEW, adapter=NAMES[0]).adapter == NAMES[0]  # still serving


# ---- the pool on its own: LRU order, vision flags, drop, restore --------------------------------------

@pytest.fixture(scope="module")
def cks(tmp_path_factory, tiny_model_dir):
    """LM-only LoRAs cal/claim/prov, a vision-tower LoRA vis, and a second checkpoint of cal (other weights, more
    layers)."""
    root = tmp_path_factory.mktemp("pool")
    out = H.make_lora_adapters(tiny_model_dir, root / "lm", ["cal", "claim", "prov"])
    out |= H.make_lora_adapters(tiny_model_dir, root / "vision", ["vis"], target_modules=H.VISION_TARGETS)
    wider = r".*language_model.*\.(q_proj|v_proj|down_proj)"  # a retrained cal that also wraps down_proj
    out["cal-v2"] = H.make_lora_adapters(tiny_model_dir, root / "v2", ["cal"], seed=7, target_modules=wider)["cal"]
    return out


def _pool(tiny_model_dir, cks, names, capacity=None):
    from vlrouter.core.encoder import load_base_model

    srcs = [residency.AdapterSource(n, cks[n]) for n in names]
    return residency.AdapterPool.load(load_base_model(str(tiny_model_dir), device="cpu"), srcs, capacity)


def _holds_weights_of(pool, name, folder) -> bool:
    """The model's LoRA weights for ``name`` are exactly those in checkpoint ``folder``."""
    from safetensors.torch import load_file

    state = pool.model.state_dict()
    saved = load_file(str(folder / "adapter_model.safetensors"))
    return all(state[k.replace(".weight", f".{name}.weight")].equal(v) for k, v in saved.items())


@pytest.mark.parametrize("cap", [0, -1])
def test_a_cap_below_one_is_refused_naming_the_setting_and_the_fix(cap):
    with pytest.raises(residency.InputError, match=rf"^max_loaded_adapters: must be >= 1, got {cap} \(fix: keep at "
                                                   r"least one adapter loaded, or pass None for all\)$"):
        residency.AdapterPool(None, capacity=cap)


def test_using_an_adapter_makes_it_the_most_recent_so_the_least_recently_used_is_evicted(tiny_model_dir, cks):
    pool = _pool(tiny_model_dir, cks, ["cal", "claim", "prov"], capacity=2)
    assert pool.resident == ["cal", "claim"] and pool.known == {"cal", "claim", "prov"} and pool.limit == 2
    pool.ensure(["cal", "base"])  # cal used again: claim is now the least recently used; base needs no adapter
    assert pool.resident == ["claim", "cal"] and (pool.loads, pool.evictions) == (0, 0)
    pool.model.base_model.model.lm_head.requires_grad_(True)  # something made a weight trainable meanwhile
    pool.ensure(["prov"])
    assert pool.resident == ["cal", "prov"] and set(pool.model.peft_config) == {"cal", "prov"}
    assert (pool.loads, pool.evictions, pool.peak) == (1, 1, 2)
    assert _holds_weights_of(pool, "prov", cks["prov"]) and _holds_weights_of(pool, "cal", cks["cal"])
    # loaded for inference like the first ones: no module in training mode (LoRA dropout), no weight that trains
    # (the engine's fast adapter switches are only right on a fully frozen model)
    assert not any(m.training for m in pool.model.modules())
    assert not any(p.requires_grad for p in pool.model.parameters())
    pool.ensure(["claim", "prov"])  # the adapter a call needs is never the one evicted for it
    assert pool.resident == ["prov", "claim"] and (pool.loads, pool.evictions) == (2, 2)
    with pytest.raises(residency.InputError, match=r"^adapters: 3 adapters in one generate call, but at most 2 may be "
                                                   r"loaded at once \(engine.max_loaded_adapters\)"):
        pool.ensure(["cal", "claim", "prov"])
    assert pool.resident == ["prov", "claim"]  # a refused call changes nothing


def test_one_adapter_at_a_time_swaps_in_every_adapter_with_its_own_weights(tiny_model_dir, cks):
    """engine.max_loaded_adapters: 1 -- the model holds no adapter between the eviction and the load (peft then
    still named the deleted adapter active, and the load failed with KeyError: 'cal')."""
    pool = _pool(tiny_model_dir, cks, ["cal", "claim", "prov"], capacity=1)
    for name in ["claim", "prov", "cal", "prov"]:
        pool.ensure([name])
        assert pool.resident == [name] and list(pool.model.peft_config) == [name]
        assert _holds_weights_of(pool, name, cks[name])
    assert (pool.loads, pool.evictions, pool.peak) == (4, 4, 1)


def test_vision_adapters_are_known_from_the_checkpoint_before_they_are_loaded(tiny_model_dir, cks):
    pool = _pool(tiny_model_dir, cks, ["cal", "vis"], capacity=1)
    assert pool.resident == ["cal"] and pool.vision_adapters() == frozenset({"vis"})  # vis not loaded yet
    pool.ensure(["vis"])
    assert pool.vision_adapters() == frozenset({"vis"})
    pool.ensure(["cal"])  # evicted again: still a vision adapter
    assert pool.vision_adapters() == frozenset({"vis"})
    # vis retrained as an LM-only LoRA while not resident: no longer a vision adapter
    srcs = [residency.AdapterSource("cal", cks["cal"]), residency.AdapterSource("vis", cks["claim"])]
    _, replaced, _ = pool.update(srcs)
    assert replaced == ["vis"] and pool.resident == ["cal"] and pool.vision_adapters() == frozenset()


def test_without_a_cap_the_limit_is_every_known_adapter_and_never_below_one(tiny_model_dir, cks):
    pool = _pool(tiny_model_dir, cks, ["cal", "claim"])
    assert pool.limit == 2
    pool.drop(["cal", "claim"])
    assert pool.known == set() and pool.limit == 1


def test_a_dropped_adapter_is_forgotten_and_a_new_one_of_its_name_starts_afresh(tiny_model_dir, cks):
    pool = _pool(tiny_model_dir, cks, ["cal", "vis"], capacity=2)
    assert pool.vision_adapters() == frozenset({"vis"}) and pool.resident == ["cal", "vis"]
    pool.drop(["vis"])
    assert pool.known == {"cal"} and pool.resident == ["cal"] and "vis" not in pool.model.peft_config
    assert pool.evictions == 0  # forgetting an adapter is no LRU eviction
    assert "vis" not in pool.stamps and pool.vision_adapters() == frozenset()
    # the name comes back for an LM-only checkpoint: not resident yet, and not a vision adapter
    added, replaced, removed = pool.update([residency.AdapterSource("cal", cks["cal"]),
                                            residency.AdapterSource("vis", cks["claim"])])
    assert (added, replaced, removed) == (["vis"], [], []) and pool.resident == ["cal"]
    assert pool.vision_adapters() == frozenset()
    pool.ensure(["vis"])
    assert _holds_weights_of(pool, "vis", cks["claim"]) and pool.vision_adapters() == frozenset()


def test_restore_undoes_an_update_reloading_the_replaced_adapter_from_its_old_folder(tiny_model_dir, cks,
                                                                                      monkeypatch):
    """What a failed router swap relies on: the adapters and weights from before, nothing added left behind."""
    pool = _pool(tiny_model_dir, cks, ["cal", "claim"])
    kept = [p for n, p in pool.model.named_parameters() if ".claim." in n]
    snap = pool.snapshot()
    loads, real = [], residency.load_adapter
    monkeypatch.setattr(residency, "load_adapter", lambda model, src: (loads.append(src.name), real(model, src)))
    added, replaced, removed = pool.update([residency.AdapterSource("cal", cks["cal-v2"]),
                                            residency.AdapterSource("prov", cks["prov"])])
    assert (added, replaced, removed) == (["prov"], ["cal"], ["claim"])
    assert _holds_weights_of(pool, "cal", cks["cal-v2"]) and "prov" in pool.model.peft_config  # no cap: loaded now
    assert any(".down_proj.lora_A.cal." in n for n, _ in pool.model.named_parameters())  # its new layers too
    assert loads == ["cal", "prov"]
    pool.restore(snap)
    assert loads == ["cal", "prov", "cal"]  # only the replaced adapter is read again
    assert pool.known == {"cal", "claim"} and sorted(pool.resident) == ["cal", "claim"]
    assert set(pool.model.peft_config) == {"cal", "claim"}
    assert _holds_weights_of(pool, "cal", cks["cal"]) and _holds_weights_of(pool, "claim", cks["claim"])
    assert not any(".down_proj.lora_A." in n for n, _ in pool.model.named_parameters())
    assert pool.sources["cal"].path == cks["cal"] and pool.evictions == 0  # swaps are not evictions
    # claim, untouched by the update, kept its weights (with hundreds resident, a restore reloads only what changed)
    now = [p for n, p in pool.model.named_parameters() if ".claim." in n]
    assert len(now) == len(kept) > 0 and all(a is b for a, b in zip(kept, now))


def test_an_adapter_that_does_not_fit_leaves_no_trace_in_the_model(tiny_model_dir, cks, tmp_path):
    """peft registers an adapter before its weights fail to load: the pool takes it out again and goes on."""
    bad = tmp_path / "bad"
    shutil.copytree(cks["prov"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2 * cfg["r"]}))  # rank 8 config, rank 4 weights
    pool = _pool(tiny_model_dir, {**cks, "bad": bad}, ["cal", "claim", "bad"], capacity=2)
    with pytest.raises(ModelLoadError, match=r"adapter 'bad' \(.*bad\) does not fit the base model: .*size mismatch"):
        pool.ensure(["bad"])
    assert "bad" not in pool.model.peft_config and set(pool.model.peft_config) == set(pool.resident)
    assert not any(".bad." in n for n, _ in pool.model.named_parameters())
    pool.ensure(["claim", "cal"])
    assert sorted(pool.resident) == ["cal", "claim"] and _holds_weights_of(pool, "cal", cks["cal"])
