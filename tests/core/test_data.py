"""Adapter datasets and the routing dataset: what users feed in, and every way it can be wrong."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from tests.helpers import corrupt_file, make_dataset, make_registry
from vlrouter.core.data import (
    build_routing_dataset,
    load_routing_dataset,
    newest_routing_dataset,
    read_adapter_dataset,
    read_routing_split,
)
from vlrouter.core.errors import DatasetError
from vlrouter.core.progress import RecordingProgress
from vlrouter.core.registry import Registry

BASE = "Qwen/Qwen3-VL-8B-Instruct"  # never loaded here


def _registry(tmp_path: Path, tasks=("calendar", "claim-window", "provider-select"), n=10) -> Registry:
    return Registry.load(make_registry(tmp_path / "proj", BASE, list(tasks), n=n))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_reads_the_seed_format(tmp_path):
    path = make_dataset(tmp_path / "cal", "calendar", 3)
    samples, skipped = read_adapter_dataset(path, adapter="calendar")
    assert not skipped and len(samples) == 3
    s = samples[0]
    rec = _lines(path)[0]
    assert s.id == rec["id"] and s.adapter == "calendar"
    assert Path(s.image).is_absolute() and Path(s.image) == (path.parent / rec["image"]).resolve()
    assert not s.prompt.startswith("<image>") and s.prompt == rec["conversations"][0]["value"][len("<image>\n"):]
    assert s.target == rec["conversations"][1]["value"]
    assert s.source == f"{path}:1"


def test_line_that_is_not_json_names_file_and_line(tmp_path):
    path = make_dataset(tmp_path / "cal", "calendar", 3)
    lines = path.read_text().splitlines()
    lines.insert(1, '{"id": "x", "image": "a.png", "conversations": [}')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"{path}:2: not valid JSON")):
        read_adapter_dataset(path, adapter="calendar")


def test_conversation_without_human_turn_names_file_and_line(tmp_path):
    path = make_dataset(tmp_path / "cal", "calendar", 3)
    recs = _lines(path)
    recs[2]["conversations"] = [{"from": "gpt", "value": "click(x=1, y=2)"}]
    path.write_text("\n\n".join(json.dumps(r) for r in recs) + "\n")  # blank lines are ignored, still counted
    with pytest.raises(DatasetError) as e:
        read_adapter_dataset(path, adapter="calendar")
    assert f"{path}:5" in str(e.value) and "no human turn" in str(e.value) and "fix:" in str(e.value)


@pytest.mark.parametrize("conversations", [None, [], {}, "<image>\nClick March 3", [[]]],
                         ids=["missing", "empty-list", "object", "text", "list-of-lists"])
def test_conversations_that_are_not_a_non_empty_list_of_turns_name_the_field_and_line(tmp_path, conversations):
    path = make_dataset(tmp_path / "cal", "calendar", 3)
    recs = _lines(path)
    recs[1]["conversations"] = conversations
    if conversations is None:
        del recs[1]["conversations"]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    problem = "a turn is not an object" if conversations == [[]] else "missing or not a non-empty list"
    with pytest.raises(DatasetError) as e:
        read_adapter_dataset(path, adapter="calendar")
    assert f"{path}:2: conversations: {problem}" in str(e.value) and "(fix: " in str(e.value), str(e.value)


def test_missing_images_are_skipped_with_a_count_and_their_ids(tmp_path):
    path = make_dataset(tmp_path / "cal", "calendar", 5)
    recs = _lines(path)
    for r in recs[:2]:
        (path.parent / r["image"]).unlink()
    samples, skipped = read_adapter_dataset(path, adapter="calendar")
    assert len(samples) == 3
    assert skipped.missing == [recs[0]["id"], recs[1]["id"]]
    assert "skipped 2 samples" in skipped.summary() and recs[0]["id"] in skipped.summary()


def test_corrupt_images_are_skipped_with_a_count(tmp_path):
    path = make_dataset(tmp_path / "cal", "calendar", 4)
    recs = _lines(path)
    corrupt_file(path.parent / recs[1]["image"])
    (path.parent / recs[2]["image"]).write_bytes(b"this is not a PNG")
    samples, skipped = read_adapter_dataset(path, adapter="calendar")
    assert [s.id for s in samples] == [recs[0]["id"], recs[3]["id"]]
    assert skipped.corrupt == [recs[1]["id"], recs[2]["id"]] and skipped.count == 2


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DatasetError, match=re.escape(f"{path}: dataset for 'calendar' is empty")):
        read_adapter_dataset(path, adapter="calendar")


def test_dataset_whose_images_are_all_missing_is_an_error_with_the_counts(tmp_path):
    path = make_dataset(tmp_path / "cal", "calendar", 3)
    for img in (path.parent / "images").iterdir():
        img.unlink()
    with pytest.raises(DatasetError, match="no usable sample for 'calendar'.*3 missing images"):
        read_adapter_dataset(path, adapter="calendar")


def test_build_routing_dataset_layout_labels_and_stratified_split(tmp_path):
    reg = _registry(tmp_path, n=10)
    prog = RecordingProgress()
    out = build_routing_dataset(reg, tmp_path / "datasets", train_samples=None, eval_samples=0, val_fraction=0.2,
                                seed=0, progress=prog)
    assert re.fullmatch(r"routing_\d{8}_\d{6}", out.name)
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "train.jsonl", "val.jsonl"]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["class_names"] == reg.adapter_names and meta["num_classes"] == 3 and meta["seed"] == 0
    assert meta["counts"] == {"train": {n: 8 for n in reg.adapter_names}, "val": {n: 2 for n in reg.adapter_names}}
    for src, entry in zip(meta["sources"], reg.adapters):
        assert src["adapter"] == entry.name and len(src["sha256"]) == 64
        assert src["path"] == str(reg.resolve(entry.dataset)) and src["read"] == 10
        assert src["sha256"] == hashlib.sha256(Path(src["path"]).read_bytes()).hexdigest()  # the file's content
    ds = load_routing_dataset(out)
    train, val = ds.split("train"), ds.split("val")
    assert {s.id for s in train}.isdisjoint({s.id for s in val})
    for s in train + val:  # label = registry position; multimodal format kept; images resolve
        assert s.label == reg.adapter_names.index(s.adapter)
        assert Path(s.image).is_file() and s.record["conversations"][0]["value"].startswith("<image>\n")
    rec = _lines(out / "train.jsonl")[0]
    assert not Path(rec["image"]).is_absolute()  # relative to the routing folder: moves with the project
    assert newest_routing_dataset(tmp_path / "datasets") == out


def test_build_is_seeded_and_adding_an_adapter_keeps_the_others_samples(tmp_path):
    reg = _registry(tmp_path, n=12)
    a = build_routing_dataset(reg, tmp_path / "d1", seed=3)
    b = build_routing_dataset(reg, tmp_path / "d2", seed=3)
    for split in ("train", "val"):
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()
    c = build_routing_dataset(reg, tmp_path / "d3", seed=4)
    assert (a / "val.jsonl").read_bytes() != (c / "val.jsonl").read_bytes()

    make_dataset(reg.root / "data" / "settings", "settings", 12)
    from vlrouter.core.registry import AdapterEntry

    bigger = reg.add_adapter(AdapterEntry(name="settings", dataset="data/settings/train.jsonl", checkpoint="c"))
    d = build_routing_dataset(bigger, tmp_path / "d4", seed=3)
    for split in ("train", "val"):
        old = {(r["id"], r["label"]) for r in _lines(a / f"{split}.jsonl")}
        new = {(r["id"], r["label"]) for r in _lines(d / f"{split}.jsonl") if r["adapter"] != "settings"}
        assert old == new
    assert json.loads((d / "metadata.json").read_text())["class_names"][-1] == "settings"


def test_sample_counts_eval_split_and_name_suffix(tmp_path, monkeypatch):
    import vlrouter.core.data as data

    reg = _registry(tmp_path, n=10)
    monkeypatch.setattr(data.time, "strftime", lambda fmt, *a: "20260101_120000")
    first = build_routing_dataset(reg, tmp_path / "ds", train_samples=5, eval_samples=3, seed=0)
    second = build_routing_dataset(reg, tmp_path / "ds", train_samples=5, eval_samples=3, seed=0)
    assert first.name == "routing_20260101_120000" and second.name == "routing_20260101_120000_2"
    meta = json.loads((first / "metadata.json").read_text())
    assert meta["counts"]["train"] == {n: 4 for n in reg.adapter_names}
    assert meta["counts"]["val"] == {n: 1 for n in reg.adapter_names}
    assert meta["counts"]["eval"] == {n: 3 for n in reg.adapter_names}
    held = {r["id"] for r in _lines(first / "eval.jsonl")}
    used = {r["id"] for s in ("train", "val") for r in _lines(first / f"{s}.jsonl")}
    assert held.isdisjoint(used)


def test_corrupt_images_drawn_into_the_routing_dataset_are_replaced_and_counted(tmp_path):
    reg = _registry(tmp_path, n=8)
    cal = reg.resolve(reg.adapter("calendar").dataset)
    recs = _lines(cal)
    for r in recs[:3]:
        corrupt_file(cal.parent / r["image"])
    prog = RecordingProgress()
    out = build_routing_dataset(reg, tmp_path / "ds", train_samples=5, seed=0, progress=prog)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["counts"]["train"]["calendar"] + meta["counts"]["val"]["calendar"] == 5
    bad = {r["id"] for r in recs[:3]}
    assert not bad & {r["id"] for s in ("train", "val") for r in _lines(out / f"{s}.jsonl")}
    assert meta["sources"][0]["skipped"]["corrupt"] >= 1
    assert any("corrupt image" in m for m in prog.messages)


def test_adapter_with_too_few_samples_to_split_names_adapter_and_file(tmp_path):
    reg = _registry(tmp_path, n=4)
    path = make_dataset(reg.root / "data" / "claim-window", "claim-window", 1)
    with pytest.raises(DatasetError) as e:
        build_routing_dataset(reg, tmp_path / "ds", seed=0)
    assert str(path) in str(e.value) and "'claim-window' has 1 usable sample" in str(e.value)
    assert not list((tmp_path / "ds").glob("routing_*")) and not list((tmp_path / "ds").glob(".routing-*"))


def test_a_single_adapter_is_refused_every_sample_would_have_one_label(tmp_path):
    reg = _registry(tmp_path, tasks=("calendar",), n=4)
    with pytest.raises(DatasetError, match="a router needs at least two adapters"):
        build_routing_dataset(reg, tmp_path / "ds", seed=0)


def test_routing_split_line_without_label_names_file_and_line(tmp_path):
    reg = _registry(tmp_path, n=4)
    out = build_routing_dataset(reg, tmp_path / "ds", seed=0)
    recs = _lines(out / "train.jsonl")
    del recs[1]["label"]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(DatasetError, match=re.escape(f"{out / 'train.jsonl'}:2: label")):
        read_routing_split(out / "train.jsonl")


def test_a_prompt_keeps_its_text_whether_or_not_it_starts_with_the_image_token(tmp_path):
    from vlrouter.core.data import strip_image_token

    assert strip_image_token("Click March 3 in the calendar") == "Click March 3 in the calendar"
    assert strip_image_token("  <image>\nClick March 3  ") == "Click March 3"
    assert strip_image_token("Click <image> March 3") == "Click  March 3"
    assert strip_image_token("<image>Click March 3") == "Click March 3"  # no newline after it: nothing else goes
    path = make_dataset(tmp_path / "cal", "calendar", 2)
    recs = _lines(path)
    recs[0]["conversations"][0]["value"] = "Click March 3 in the calendar"  # no <image> placeholder
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    samples, _ = read_adapter_dataset(path, adapter="calendar")
    assert samples[0].prompt == "Click March 3 in the calendar"


@pytest.mark.parametrize("change,problem", [
    ({"label": 1}, "label 1 / adapter 'calendar' disagrees with metadata.json class_names"),
    ({"label": 7}, "label 7 / adapter 'calendar' disagrees with metadata.json class_names"),
    ({"label": 3}, "label 3 / adapter 'calendar' disagrees with metadata.json class_names"),  # == the class count
], ids=["other-adapters-label", "label-out-of-range", "label-one-past-the-last"])
def test_a_routing_sample_whose_label_and_adapter_disagree_is_refused(tmp_path, change, problem):
    reg = _registry(tmp_path, n=4)
    out = build_routing_dataset(reg, tmp_path / "ds", seed=0)
    recs = _lines(out / "val.jsonl")
    i = next(i for i, r in enumerate(recs) if r["adapter"] == "calendar")
    recs[i].update(change)
    (out / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(DatasetError) as e:
        load_routing_dataset(out).split("val")
    assert f"{out / 'val.jsonl'}:{i + 1}: label: {problem}" in str(e.value), str(e.value)
    assert "(fix: rebuild the routing dataset with `router build-dataset`)" in str(e.value)


@pytest.mark.parametrize("n,fraction,counts", [(10, 0.2, (8, 2)), (2, 0.2, (1, 1)), (3, 0.9, (1, 2))])
def test_each_class_splits_into_train_and_validation_with_at_least_one_of_each(n, fraction, counts):
    from vlrouter.core.data import split_counts

    assert split_counts(n, fraction) == counts


def test_a_sample_is_its_fields_not_the_raw_record_it_came_from(tmp_path):
    """Samples compare and print by what vlrouter uses; the original JSON object rides along unshown."""
    import dataclasses

    path = make_dataset(tmp_path / "cal", "calendar", 2)
    s = read_adapter_dataset(path, adapter="calendar")[0][0]
    copy = dataclasses.replace(s, record={**s.record, "extra": "x" * 500})
    assert copy == s and "x" * 50 not in repr(copy) and s.prompt in repr(copy)
