"""engine.max_loaded_adapters: at most N LoRAs in the model, others loaded on first use; answers as all resident."""

from __future__ import annotations

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
