"""Synthetic demo screenshots: determinism, the seed's JSONL format, actions on drawn targets."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlrouter.core.errors import InputError
from vlrouter.demo.screens import (
    GENERIC_INSTRUCTIONS,
    TASKS,
    Sample,
    render_sample,
    write_dataset,
    write_heldout,
)

ACTION_RE = re.compile(r'^(click\(x=\d+, y=\d+\)|type\(text="[^"]*"\))$')
CLICK_RE = re.compile(r"^click\(x=(\d+), y=(\d+)\)$")


def _samples(task: str, n: int, stream: str = "t") -> list[Sample]:
    return [render_sample(task, random.Random(f"{stream}/{task}/{i}"), i) for i in range(n)]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_gives_identical_bytes(tmp_path, task):
    write_dataset(task, tmp_path / "a", n=6, seed=3)
    write_dataset(task, tmp_path / "b", n=6, seed=3)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert len(a) == 7  # six PNGs and train.jsonl
    assert a == b


def test_render_sample_depends_only_on_the_rng():
    for task in TASKS:
        one = render_sample(task, random.Random(42), 5)
        two = render_sample(task, random.Random(42), 5)
        assert (one.instruction, one.action, one.target) == (two.instruction, two.action, two.target)
        assert one.image.tobytes() == two.image.tobytes()
        assert one.id == f"{task}-000005"


@pytest.mark.parametrize("task", TASKS)
def test_different_seeds_differ(tmp_path, task):
    a = write_dataset(task, tmp_path / "a", n=6, seed=0)
    b = write_dataset(task, tmp_path / "b", n=6, seed=1)
    assert a.read_bytes() != b.read_bytes()
    pngs_a, pngs_b = sorted((tmp_path / "a/images").iterdir()), sorted((tmp_path / "b/images").iterdir())
    assert [p.name for p in pngs_a] == [p.name for p in pngs_b]
    assert all(x.read_bytes() != y.read_bytes() for x, y in zip(pngs_a, pngs_b))


def test_a_longer_dataset_starts_with_the_shorter_one(tmp_path):
    short = write_dataset("calendar", tmp_path / "short", n=3, seed=7).read_text().splitlines()
    long = write_dataset("calendar", tmp_path / "long", n=5, seed=7).read_text().splitlines()
    assert long[:3] == short


@pytest.mark.parametrize("task", TASKS)
def test_jsonl_has_the_seed_format(tmp_path, task):
    path = write_dataset(task, tmp_path / task, n=12, seed=5)
    assert path == tmp_path / task / "train.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 12
    for i, line in enumerate(lines):
        rec = json.loads(line)
        assert set(rec) == {"id", "image", "conversations", "metadata"}
        assert rec["id"] == f"{task}-{i:06d}"
        assert rec["image"] == f"images/{rec['id']}.png"
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") and human["value"].strip() != "<image>"
        assert ACTION_RE.match(gpt["value"]), gpt["value"]
        with Image.open(path.parent / rec["image"]) as img:
            img.load()
            assert img.format == "PNG" and img.mode == "RGB"
            assert rec["metadata"] == {"task": task, "seed": 5, "width": img.width, "height": img.height}
            assert 320 <= img.width <= 480 and 240 <= img.height <= 360


@pytest.mark.parametrize("task", TASKS)
def test_actions_hit_the_centre_of_a_drawn_target(task):
    kinds = set()
    for s in _samples(task, 120):
        kinds.add(s.action.split("(")[0])
        assert ACTION_RE.match(s.action), s.action
        x0, y0, x1, y1 = s.target
        assert 1 <= x0 < x1 < s.image.width - 1 and 1 <= y0 < y1 < s.image.height - 1, s.id
        click = CLICK_RE.match(s.action)
        if click:
            x, y = int(click[1]), int(click[2])
            assert (x, y) == ((x0 + x1) // 2, (y0 + y1) // 2), s.id
        else:  # type(text=...) goes into a field whose value the instruction states
            assert task == "claim-window"
            assert s.action[len('type(text="'):-2] in s.instruction
        # Something is drawn exactly on the box: its left and right edges differ from just outside.
        px = s.image.load()
        ym = (y0 + y1) // 2
        assert px[x0, ym] != px[x0 - 1, ym] and px[x1, ym] != px[x1 + 1, ym], s.id
    assert kinds == ({"click", "type"} if task == "claim-window" else {"click"})


def test_generic_instructions_are_shared_across_tasks():
    per_task = {task: [s.instruction for s in _samples(task, 120)] for task in TASKS}
    for task, texts in per_task.items():
        share = sum(t in GENERIC_INSTRUCTIONS for t in texts) / len(texts)
        assert 0.1 <= share <= 0.3, (task, share)
        assert len(set(texts)) > 40, task  # the task-specific templates vary
    for text in GENERIC_INSTRUCTIONS:
        users = [task for task, texts in per_task.items() if text in texts]
        assert len(users) >= 2, (text, users)


def test_tasks_look_different():
    """A 1-nearest-neighbour on 16x12 grey thumbnails tells the tasks apart across seeds."""

    def thumbs(stream: str, n: int):
        feats, labels = [], []
        for label, task in enumerate(TASKS):
            for s in _samples(task, n, stream):
                feats.append(np.asarray(s.image.convert("L").resize((16, 12)), dtype=np.float32).ravel() / 255)
                labels.append(label)
        return np.stack(feats), np.array(labels)

    train_x, train_y = thumbs("fit", 30)
    test_x, test_y = thumbs("check", 20)
    nearest = ((test_x[:, None] - train_x[None]) ** 2).sum(-1).argmin(1)
    assert (train_y[nearest] == test_y).mean() >= 0.9


def test_screens_vary_within_a_task():
    for task in TASKS:
        samples = _samples(task, 30)
        assert len({s.image.size for s in samples}) > 10
        means = [tuple(np.asarray(s.image).reshape(-1, 3).mean(0).round()) for s in samples]
        assert len(set(means)) > 20  # colours and themes change


def test_write_heldout(tmp_path):
    rows = write_heldout(tmp_path / "heldout", n_per_task=3, seed=0)
    assert [r["task"] for r in rows] == [t for t in TASKS for _ in range(3)]
    for r in rows:
        assert set(r) == {"image", "prompt", "task", "action"}
        assert ACTION_RE.match(r["action"])
        assert not r["prompt"].startswith("<image>")
        with Image.open(r["image"]) as img:
            assert img.size[0] >= 320
    # Same seed, same id, but another stream than the training set.
    write_dataset("calendar", tmp_path / "train", n=1, seed=0)
    assert Path(rows[0]["image"]).name == "calendar-000000.png"
    assert Path(rows[0]["image"]).read_bytes() != (tmp_path / "train/images/calendar-000000.png").read_bytes()
    again = write_heldout(tmp_path / "again", n_per_task=3, seed=0)
    assert [(r["prompt"], r["action"]) for r in again] == [(r["prompt"], r["action"]) for r in rows]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(InputError, match="unknown demo task"):
        render_sample("weather", random.Random(0), 0)
    with pytest.raises(InputError, match="unknown demo task"):
        write_dataset("weather", tmp_path, n=1)
    with pytest.raises(InputError):
        write_dataset("calendar", tmp_path, n=0)
    with pytest.raises(InputError):
        write_heldout(tmp_path, n_per_task=0, seed=0)


def test_400_samples_render_quickly():
    start = time.perf_counter()
    for task in TASKS:
        _samples(task, 100, "speed")
    assert time.perf_counter() - start < 10
