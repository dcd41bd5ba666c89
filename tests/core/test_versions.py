"""Router versions: old ones are pruned, the live one never is, whatever the version folders are called.

Version folder names start with a timestamp and end with a random suffix, so in real use their sort
order follows the clock -- until the clock is set back, two promotions land in one second, or a user
rolls back to an older version. These tests name the folders themselves, so the order is fixed.
"""

from __future__ import annotations

import os

import torch

from vlrouter.core.head import HeadShape, build_head
from vlrouter.core.store import KEEP_VERSIONS, RouterMeta, load_router, promote, save_router, versions_dir


def _write(folder, tag: int):
    shape = HeadShape(in_dim=4, num_labels=2)
    torch.manual_seed(tag)
    meta = RouterMeta(adapters=["a", "b"], base_model="Qwen/Qwen3-VL-8B-Instruct", pooling="mean", layer=-1,
                      hidden_size=4, head=shape, metrics={"tag": tag})
    return save_router(folder, build_head(shape), meta)


def _live_tag(live) -> int:
    _, meta = load_router(live)
    return meta.metrics["tag"]


def test_promoting_a_version_whose_name_sorts_first_keeps_it_live(tmp_path):
    live = tmp_path / "runs" / "router"
    vd = versions_dir(live)
    for i in range(1, KEEP_VERSIONS + 2):  # more versions than are kept, promoted in name order
        promote(_write(vd / f"20260101-00000{i}-aaaaaa", i), live)
    assert _live_tag(live) == KEEP_VERSIONS + 1
    # The clock was set back: the newest version's name sorts before every other one.
    newest = _write(vd / "20250101-000000-ffffff", 99)
    assert promote(newest, live) == live
    assert os.path.realpath(live) == os.path.realpath(newest)
    assert _live_tag(live) == 99  # the live router still loads: it was not pruned
    kept = sorted(p.name for p in vd.iterdir() if p.is_dir())
    assert newest.name in kept
    assert len(kept) <= KEEP_VERSIONS + 1  # old ones are still pruned


def test_rolling_back_to_the_oldest_kept_version_keeps_it(tmp_path):
    live = tmp_path / "router"
    vd = versions_dir(live)
    for i in range(1, KEEP_VERSIONS + 1):
        promote(_write(vd / f"20260101-00000{i}-aaaaaa", i), live)
    oldest = vd / "20260101-000001-aaaaaa"
    newer = _write(vd / "20260101-000009-aaaaaa", 9)  # a candidate written but not promoted (the gate refused)
    promote(oldest, live)  # roll back: now more than KEEP_VERSIONS folders, and the live one sorts first
    assert _live_tag(live) == 1
    assert oldest.is_dir() and newer.is_dir()


def test_a_router_folder_from_elsewhere_is_copied_in_and_left_as_it_was(tmp_path):
    live = tmp_path / "runs" / "router"
    promote(_write(versions_dir(live) / "20260101-000001-aaaaaa", 1), live)
    outside = _write(tmp_path / "downloaded-router", 7)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    assert promote(outside, live) == live
    assert _live_tag(live) == 7
    assert os.path.realpath(live).startswith(os.path.realpath(versions_dir(live)))  # a copy, among the versions
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def test_version_names_sort_in_creation_order_across_a_second_boundary(tmp_path, monkeypatch):
    """A version made at hh:mm:20.954 and the next at hh:mm:21.001 (the clock ticked in between): the newer
    name sorts last, so pruning keeps the newest (was: the second came from one clock reading and the
    nanoseconds from another, so a tick between them named the newer folder ...20-001..., sorting first)."""
    import time
    import types

    from vlrouter.core import store
    from vlrouter.core.store import new_version_dir

    base = 1_795_000_000 * 10**9  # a whole second, as nanoseconds since the epoch
    clock = iter([base + 954_000_000, base + 10**9 + 1_000_000])
    monkeypatch.setattr(store, "time", types.SimpleNamespace(time_ns=lambda: next(clock), strftime=time.strftime,
                                                             localtime=time.localtime))
    first, second = new_version_dir(tmp_path / "router"), new_version_dir(tmp_path / "router")
    assert sorted([second.name, first.name]) == [first.name, second.name]
    assert second.name.startswith(time.strftime("%Y%m%d-%H%M%S", time.localtime(base // 10**9 + 1)) + "-001000000-")
