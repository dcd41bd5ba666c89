"""The routing dataset's seed: the same seed draws and splits the same samples, another seed others, and the
seed given as an option (registry.yaml ``train.seed`` or ``--seed``) is the one used."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import make_registry
from vlrouter.core.data import build_routing_dataset
from vlrouter.core.options import resolve_options
from vlrouter.core.recipe import build_dataset
from vlrouter.core.registry import Registry

BASE = "Qwen/Qwen3-VL-8B-Instruct"  # never loaded here
SPLITS = ("train", "val", "eval")


def _ids(folder: Path) -> dict[str, set[str]]:
    """The sample ids of each split (as sets: which samples, not their order)."""
    out = {}
    for split in SPLITS:
        p = folder / f"{split}.jsonl"
        out[split] = {json.loads(line)["id"] for line in p.read_text().splitlines() if line.strip()} \
            if p.exists() else set()
    return out


def _registry(tmp_path: Path) -> Registry:
    return Registry.load(make_registry(tmp_path / "proj", BASE, ["calendar", "claim-window"], n=16))


def test_same_seed_same_samples_and_split_another_seed_other_samples(tmp_path):
    reg = _registry(tmp_path)
    kw = {"train_samples": 6, "eval_samples": 2}  # 8 of 16 per adapter: which 8 depends on the seed
    a = build_routing_dataset(reg, tmp_path / "a", seed=3, **kw)
    b = build_routing_dataset(reg, tmp_path / "b", seed=3, **kw)
    for split in SPLITS:
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()
    c = build_routing_dataset(reg, tmp_path / "c", seed=4, **kw)
    ia, ic = _ids(a), _ids(c)
    assert set().union(*ia.values()) != set().union(*ic.values())  # another draw
    assert ia["val"] != ic["val"]  # another split


def test_the_seed_option_reaches_the_routing_dataset(tmp_path):
    reg = _registry(tmp_path)
    opts = resolve_options(reg, {"seed": 4, "train_samples": 6, "eval_samples": 2, "datasets_dir": "ds4"})
    via_options = build_dataset(reg, opts)
    direct = build_routing_dataset(reg, tmp_path / "direct", train_samples=6, eval_samples=2, seed=4)
    default = build_routing_dataset(reg, tmp_path / "default", train_samples=6, eval_samples=2, seed=0)
    assert json.loads((via_options / "metadata.json").read_text())["seed"] == 4
    assert _ids(via_options) == _ids(direct)
    assert _ids(via_options) != _ids(default)
