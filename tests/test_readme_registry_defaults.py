"""README's registry.yaml reference states the real defaults and bounds (a default changed in code, or a
bound loosened, fails here until the README says so too)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from vlrouter.core.errors import RegistryError
from vlrouter.core.registry import Registry, RegistryModel

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _section(heading: str) -> str:
    start = README.index(heading)
    end = README.find("\n## ", start + len(heading))
    return README[start:end if end != -1 else None]


def _value(text: str):
    v = YAML(typ="safe").load(text)
    return None if v == "null" else v


def _table_defaults() -> dict[str, object]:
    rows = re.findall(r"^\| `([a-z0-9_.]+)` \| `([^`]*)` \|", _section("## registry.yaml reference"), re.M)
    return {key: _value(default) for key, default in rows}


def _model_value(model: RegistryModel, key: str):
    value = model
    for part in key.split("."):
        value = getattr(value, part)
    return value


# unset in code, documented by what it does: no eval samples
EFFECTIVE = {("train.eval_samples", None): 0}


def test_the_reference_table_defaults_are_the_code_defaults():
    table = _table_defaults()
    assert len(table) >= 20, "the registry.yaml reference table was not found"
    model = RegistryModel(base_model="m")
    code = {k: EFFECTIVE.get((k, _model_value(model, k)), _model_value(model, k)) for k in table}
    wrong = {k: (v, code[k]) for k, v in table.items() if code[k] != v}
    assert not wrong, f"README default -> code default: {wrong}"


def test_the_modal_block_shows_the_code_defaults():
    block = re.search(r"Rename them \(or the app\) in\s+registry\.yaml:\s+```yaml\n(.*?)```", README, re.S)
    assert block, "README's modal defaults block was not found"
    assert YAML(typ="safe").load(block.group(1))["modal"] == RegistryModel(base_model="m").modal.model_dump()
    assert re.search(r"`modal\.cpu_shards` of them \(default (\d+)\)", README).group(1) == str(
        RegistryModel(base_model="m").modal.cpu_shards)


BOUNDS = [  # (key, refused, accepted): the edges of what registry.yaml accepts
    ("train.val_fraction", ["0.0", "1.0"], ["0.01", "0.99"]),
    ("train.epochs", ["0"], ["1"]),
    ("train.batch_size", ["0"], ["1"]),
    ("train.lr", ["0.0"], ["1.0e-9"]),
    ("train.patience", ["0"], ["1"]),
    ("train.eval_every", ["0"], ["1"]),
    ("train.head_hidden", ["0"], ["1"]),
    ("train.train_samples", ["0"], ["1"]),
    ("train.eval_samples", ["-1"], ["0"]),
    ("train.workers", ["0"], ["1"]),
    ("train.embed_batch_size", ["0"], ["1"]),
    ("modal.cpu_shards", ["0"], ["1"]),
    ("train.cv_folds", ["1"], ["2"]),
    ("train.l2", ["0.0", "-1.0", ".inf"], ["1.0e-9"]),
    ("router.max_prompt_tokens", ["0"], ["1"]),
    ("router.layer", ["1.5", "true", "top"], ["0", "-1"]),
]


def _load(tmp_path: Path, key: str, value: str) -> Registry:
    section, field = key.split(".")
    p = tmp_path / "registry.yaml"
    p.write_text(f"base_model: m\n{section}:\n  {field}: {value}\nadapters:\n"
                 "  - name: calendar\n    dataset: d.jsonl\n    checkpoint: c\n")
    return Registry.load(p)


@pytest.mark.parametrize(("key", "refused", "accepted"), BOUNDS, ids=[b[0] for b in BOUNDS])
def test_bounds_refuse_and_accept_at_the_edge(tmp_path, key, refused, accepted):
    for value in refused:
        with pytest.raises(RegistryError, match=re.escape(key)):
            _load(tmp_path, key, value)
    for value in accepted:
        assert _model_value(_load(tmp_path, key, value).model, key) == _value(value)


def test_a_control_character_is_named_by_its_line(tmp_path):
    p = tmp_path / "registry.yaml"
    p.write_text("\nbase_model: m\nadapters: [\x01]\n")  # a blank first line, the bad character on line 3
    with pytest.raises(RegistryError, match=r"registry\.yaml:3: .*unacceptable character #x0001"):
        Registry.load(p)


def test_every_registry_setting_has_a_row():
    """A setting added in code without a README row fails here (modal's block is checked above)."""
    table = re.findall(r"^\| `([a-z0-9_.]+)` \|", _section("## registry.yaml reference"), re.M)
    model = RegistryModel(base_model="m")
    keys = {f"{section}.{name}" for section in ("router", "train")
            for name in type(getattr(model, section)).model_fields}
    assert sorted(keys - set(table)) == []
