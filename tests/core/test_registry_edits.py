"""registry.yaml edits keep what the user wrote (quotes too); several mistakes are counted in one error."""

from __future__ import annotations

import pytest

from vlrouter.core.errors import RegistryError
from vlrouter.core.registry import AdapterEntry, Registry

TEXT = """base_model: "Qwen/Qwen3-VL-8B-Instruct"   # quoted on purpose
router:
  dir: 'runs/router'
adapters:
  - name: calendar
    dataset: "data/calendar/train.jsonl"
    checkpoint: checkpoints/calendar
"""


def test_an_edit_keeps_quotes_comments_and_saves_where_asked(tmp_path):
    p = tmp_path / "registry.yaml"
    p.write_text(TEXT)
    edited = Registry.load(p).add_adapter(AdapterEntry(name="claim-window", dataset="d.jsonl", checkpoint="c"))
    out = tmp_path / "copy.yaml"
    assert edited.save(out) == out and edited.save() == p
    text = p.read_text()
    assert text.startswith(TEXT)  # the user's lines, byte for byte, then the new adapter
    assert "name: claim-window" in text and Registry.load(p).adapter_names == ["calendar", "claim-window"]


def test_several_mistakes_name_the_first_and_count_the_rest(tmp_path):
    p = tmp_path / "registry.yaml"
    p.write_text(TEXT.replace("router:\n", "router:\n  pooling: first\n  layer: top\n"))
    with pytest.raises(RegistryError, match=r"\(\+1 more\)"):
        Registry.load(p)
    p.write_text(TEXT.replace("router:\n", "router:\n  pooling: first\n"))
    with pytest.raises(RegistryError) as e:
        Registry.load(p)
    assert "more)" not in str(e.value)


@pytest.mark.parametrize("columns,folded", [(4096, False), (4097, True)], ids=["4096-columns", "4097-columns"])
def test_an_edit_folds_a_long_value_only_past_4096_columns_and_keeps_it(tmp_path, columns, folded):
    p = tmp_path / "registry.yaml"
    p.write_text(TEXT)
    prefix = "    description: "
    description = "x" * (columns - len(prefix) - len(" tail")) + " tail"
    Registry.load(p).add_adapter(AdapterEntry(name="claim-window", dataset="d.jsonl", checkpoint="c",
                                              description=description)).save()
    lines = p.read_text().splitlines()
    assert (prefix + description in lines) is not folded
    assert Registry.load(p).adapters[-1].description == description  # folded or not, the same value
