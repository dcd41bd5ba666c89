"""The router store's edges: a router.json with a bad field names it, the lock folder is made, a live router
that does not fit the candidate's features does not block promotion."""

from __future__ import annotations

import json

import pytest
import torch

from vlrouter.core.errors import CheckpointError
from vlrouter.core.gate import promote_with_gate
from vlrouter.core.head import HeadShape, build_head
from vlrouter.core.store import RouterLock, RouterMeta, load_router, promote, read_meta, save_router

BASE = "Qwen/Qwen3-VL-8B-Instruct"


def _router(folder, in_dim: int, acc: float):
    shape = HeadShape(in_dim=in_dim, num_labels=2)
    meta = RouterMeta(adapters=["a", "b"], base_model=BASE, pooling="mean", layer=-1, hidden_size=in_dim, head=shape,
                      metrics={"val_acc": acc, "n_val": 4}, encoder_fingerprint="enc")
    return save_router(folder, build_head(shape), meta)


def test_an_invalid_router_json_field_is_named(tmp_path):
    folder = _router(tmp_path / "r", 4, 1.0)
    meta = json.loads((folder / "router.json").read_text())
    (folder / "router.json").write_text(json.dumps({**meta, "layer": "last"}))
    with pytest.raises(CheckpointError, match=r"router\.json.*layer.*invalid router\.json"):
        read_meta(folder)


def test_the_lock_makes_the_router_folders_parents(tmp_path):
    router_dir = tmp_path / "a" / "b" / "runs" / "router"
    with RouterLock(router_dir) as lock:
        assert lock.path.exists()


def test_a_live_router_that_does_not_fit_the_features_does_not_block_promotion(tmp_path):
    live = tmp_path / "router"
    promote(_router(tmp_path / "old", 4, 1.0), live)  # hand-copied, same labels and encoder, other width
    cand = _router(tmp_path / "new", 8, 0.75)
    head, _ = load_router(cand)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    labels = head(x).argmax(1).tolist()  # samples the candidate gets right: it beats chance
    assert len(set(labels)) == 2
    d = promote_with_gate(cand, live, val_views={"mean@-1": x}, val_labels=labels)
    assert d.promoted and d.live_val_acc is None and "does not fit" in d.message
    assert read_meta(live).hidden_size == 8


def test_without_validation_features_the_gate_promotes_and_says_why(tmp_path):
    live = tmp_path / "router"
    promote(_router(tmp_path / "old", 4, 1.0), live)
    d = promote_with_gate(_router(tmp_path / "new", 4, 0.75), live)  # below the live 1.0, above chance 0.5
    assert d.promoted and d.live_val_acc is None and "no validation features" in d.message


def test_router_json_defaults_for_what_a_writer_left_out():
    meta = RouterMeta(adapters=["a", "b"], base_model=BASE, pooling="mean", layer=-1, hidden_size=4,
                      head=HeadShape(in_dim=4, num_labels=2))
    assert (meta.temperature, meta.embedded_new, meta.reused_cached, meta.metrics) == (1.0, 0, 0, {})
    assert meta.best_loss is None and meta.best_acc is None and meta.created_at


def test_without_validation_features_chance_counts_only_the_adapters_validation_held(tmp_path):
    """router.json's per-class recalls: an adapter with no validation samples is neither a recall nor a class."""
    from vlrouter.core.errors import PromotionRefused

    shape = HeadShape(in_dim=4, num_labels=3)
    per = {"a": {"recall": 0.5, "support": 4}, "b": {"recall": 0.5, "support": 4}, "c": {"recall": 0.0, "support": 0}}
    meta = RouterMeta(adapters=["a", "b", "c"], base_model=BASE, pooling="mean", layer=-1, hidden_size=4, head=shape,
                      metrics={"val_acc": 0.5, "n_val": 8, "per_class": per}, encoder_fingerprint="enc")
    cand = save_router(tmp_path / "cand", build_head(shape), meta)
    with pytest.raises(PromotionRefused, match=r"balanced accuracy 0.500 does not beat chance 0.500 on 8 validation"):
        promote_with_gate(cand, tmp_path / "router", force=True)


def test_temperatures_at_the_lower_limit_load_and_below_it_are_damage(tmp_path):
    folder = _router(tmp_path / "r", 4, 1.0)
    meta = json.loads((folder / "router.json").read_text())
    for ok in (1e-3, 0.05):  # the limit itself, and the lowest temperature calibration gives
        (folder / "router.json").write_text(json.dumps({**meta, "temperature": ok}))
        assert load_router(folder)[1].temperature == ok
    (folder / "router.json").write_text(json.dumps({**meta, "temperature": 9e-4}))
    with pytest.raises(CheckpointError, match="temperature 0.0009 is not a finite number between 0.001 and 1000"):
        load_router(folder)


def _ood_router(folder, dim=4, n=40):
    from vlrouter.core.ood import calibrate, fit_ood

    shape = HeadShape(in_dim=dim, num_labels=2)
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1] * (n // 2))
    x[:, 0] += 4 * y
    head = build_head(shape)
    head[0].fit(x)
    ood = calibrate(fit_ood(head[0](x), y.tolist(), 2), head[0](x[:10]), None, None)
    meta = RouterMeta(adapters=["a", "b"], base_model=BASE, pooling="mean", layer=-1, hidden_size=dim, head=shape,
                      metrics={"val_acc": 1.0, "n_val": 10})
    return save_router(folder, head, meta, ood=ood)


@pytest.mark.parametrize("name,shape", [("ood.means", (3, 4)), ("ood.basis", (5, 1))])
def test_ood_statistics_that_do_not_fit_the_head_are_named_before_loading(tmp_path, name, shape):
    from safetensors.torch import load_file, save_file

    folder = _ood_router(tmp_path / "r")
    router = load_router(folder)
    assert router[1].ood is not None  # the intact folder loads, OOD statistics and all
    state = load_file(str(folder / "head.safetensors"))
    state[name] = torch.zeros(shape)
    save_file(state, str(folder / "head.safetensors"))
    with pytest.raises(CheckpointError,
                       match=r"ood: the OOD statistics do not fit the head \(2 x 4\).*router.ood: off"):
        load_router(folder)


@pytest.mark.parametrize("router_layer,setting,stale", [
    (0, 0, False), (2, 2, False), (-1, 2, False), (2, -1, False), (-3, 0, False), (0, -3, False),
    (0, 2, True), (2, 0, True), (-1, 0, True), (0, -1, True), (1, -1, True),
])
def test_a_router_layer_matches_the_registry_setting_counting_negative_layers_from_the_end(
        router_layer, setting, stale):
    """A model of 2 layers has hidden states 0 (embeddings), 1, 2: -1 is 2, -3 is 0."""
    from vlrouter.core.errors import StaleRouterError
    from vlrouter.core.store import check_compatible

    meta = RouterMeta(adapters=["a", "b"], base_model=BASE, pooling="mean", layer=router_layer, num_layers=2,
                      hidden_size=4, head=HeadShape(in_dim=4, num_labels=2))
    if not stale:
        check_compatible(meta, adapters=["a", "b"], layer=setting)
        return
    with pytest.raises(StaleRouterError, match=f"layer: stale router: layer {router_layer}, registry says {setting}"):
        check_compatible(meta, adapters=["a", "b"], layer=setting)


def test_promotion_removes_a_crashed_older_candidate_but_not_one_still_being_written(tmp_path):
    from vlrouter.core.store import new_version_dir, versions_dir

    live = tmp_path / "router"
    promote(_router(new_version_dir(live), 4, 1.0), live)
    crashed = new_version_dir(live)  # no router.json: a crash mid-write, before the candidate below
    cand = _router(new_version_dir(live), 4, 1.0)
    writing = new_version_dir(live)  # another process's candidate, started after ours, not finished yet
    promote(cand, live)
    assert not crashed.exists() and writing.is_dir()
    assert len(list(versions_dir(live).iterdir())) == 3  # the first live version, ours, and the one being written
    assert (live / "router.json").is_file() and read_meta(live).hidden_size == 4


def test_a_router_json_key_from_a_newer_vlrouter_is_named_in_a_warning_and_ignored(tmp_path):
    folder = _router(tmp_path / "r", 4, 1.0)
    meta = json.loads((folder / "router.json").read_text())
    (folder / "router.json").write_text(json.dumps({**meta, "calibration_v3": {"a": 1}}))
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['calibration_v3'\]"):
        head, loaded = load_router(folder)
    assert loaded.adapters == ["a", "b"] and head[1].weight.shape == (2, 4)


def test_a_head_width_that_does_not_match_the_representation_is_named(tmp_path):
    folder = _router(tmp_path / "r", 4, 1.0)
    meta = json.loads((folder / "router.json").read_text())
    (folder / "router.json").write_text(json.dumps({**meta, "hidden_size": 8}))  # mean of 8 dims: 8 features
    with pytest.raises(CheckpointError, match=r"head\.in_dim: the head takes 4 features, but .* of hidden size 8 "
                                              r"gives 8 \(fix: retrain"):
        read_meta(folder)


@pytest.mark.parametrize("text", ["[1, 2]", "\"router\"", "null"])
def test_a_router_json_that_is_not_an_object_is_named(tmp_path, text):
    folder = _router(tmp_path / "r", 4, 1.0)
    (folder / "router.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"router\.json: top level is not an object \(fix: retrain"):
        read_meta(folder)


@pytest.mark.parametrize("layer,num_layers,resolved", [(-1, 2, 2), (-3, 2, 0), (1, 2, 1), (0, 2, 0), (0, None, 0),
                                                       (-1, None, -1)])
def test_a_router_reads_its_layer_counted_from_the_end_when_it_knows_the_depth(layer, num_layers, resolved):
    meta = RouterMeta(adapters=["a", "b"], base_model=BASE, pooling=["mean"], layer=layer, num_layers=num_layers,
                      hidden_size=4, head=HeadShape(in_dim=4, num_labels=2))
    assert meta.representation().layer == resolved  # format 1 (no num_layers): -1 stays "the last"


@pytest.mark.parametrize("dim", [8, 300], ids=["few-samples", "wider-than-the-rank-limit"])
def test_ood_statistics_with_fewer_directions_than_features_load(tmp_path, dim):
    """6 samples span at most 6 directions: the basis is [D, r] with r < D, and D may exceed MAX_RANK."""
    from vlrouter.core.store import read_router

    folder = _ood_router(tmp_path / "r", dim=dim, n=6)
    router = read_router(folder)
    d, r = router.ood.basis.shape
    assert d == dim and 1 <= r < 6 and router.ood.weights.shape == (r,)
    scores = router.ood.score(router.head[0](torch.zeros(3, dim)), None)
    assert scores.shape == (3,) and torch.isfinite(scores).all()


def test_a_head_that_does_not_match_router_json_names_its_first_differences(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _router(tmp_path / "r", 4, 1.0)
    state = load_file(str(folder / "head.safetensors"))
    for name in ("0.mean", "0.std", "1.weight", "1.bias"):  # every tensor of another width
        state[name] = torch.ones(*[5 if n == 4 else n for n in state[name].shape])
    save_file(state, str(folder / "head.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_router(folder)
    # the first differing tensor, with the shape router.json implies and the one in the file; not all of them
    assert ("weights do not match router.json's head shape (linear, 4 -> 2): differs at "
            "[('0.mean', (4,)), ('0.mean', (5,))] (fix: retrain") in str(e.value)


def test_a_router_is_written_in_format_2_and_a_later_format_is_refused(tmp_path):
    """Format 2 (views list, hidden-state layer, OOD statistics): what vlrouter releases since it read and write."""
    from safetensors import safe_open

    folder = _router(tmp_path / "r", 4, 1.0)
    meta = json.loads((folder / "router.json").read_text())
    assert meta["format_version"] == 2
    with safe_open(str(folder / "head.safetensors"), framework="pt") as f:
        assert f.metadata()["vlrouter_format_version"] == "2"
    (folder / "router.json").write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(CheckpointError, match=r"format_version: format 3 is newer than this vlrouter understands "
                                              r"\(2\)"):
        read_meta(folder)


def test_an_ood_basis_of_exactly_the_rank_limit_loads_and_one_more_direction_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from vlrouter.core.ood import MAX_RANK
    from vlrouter.core.store import read_router

    folder = _ood_router(tmp_path / "r", dim=MAX_RANK + 8, n=6)
    state = load_file(str(folder / "head.safetensors"))
    for rank, loads in ((MAX_RANK, True), (MAX_RANK + 1, False)):
        basis = torch.zeros(MAX_RANK + 8, rank)
        basis[:rank, :rank] = torch.eye(rank)  # orthonormal directions, as fit_ood keeps them
        save_file({**state, "ood.basis": basis, "ood.weights": torch.full((rank,), 0.5)},
                  str(folder / "head.safetensors"))
        if loads:
            assert read_router(folder).ood.basis.shape == (MAX_RANK + 8, MAX_RANK)
        else:
            with pytest.raises(CheckpointError, match="ood: the OOD statistics do not fit the head"):
                read_router(folder)


def test_a_lock_beside_a_router_dir_whose_parent_is_a_file_is_a_located_storage_error(tmp_path):
    from vlrouter.core.errors import StorageError

    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(StorageError, match="router.dir"):
        RouterLock(tmp_path / "runs" / "router")


def test_a_saved_router_is_fsynced_and_records_the_vlrouter_that_wrote_it(tmp_path, monkeypatch):
    import os

    from vlrouter import __version__

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
                        or real(fd))
    folder = _router(tmp_path / "r", 4, 1.0)
    assert sorted(synced) == ["head.safetensors", "router.json"]  # on disk before promotion can point at them
    assert json.loads((folder / "router.json").read_text())["vlrouter_version"] == __version__
    shape = HeadShape(in_dim=4, num_labels=2)
    old = RouterMeta(adapters=["a", "b"], base_model=BASE, pooling="mean", layer=-1, hidden_size=4, head=shape,
                     vlrouter_version="0.1.0")  # re-saved (e.g. after a Modal download): its writer is kept
    assert read_meta(save_router(tmp_path / "old", build_head(shape), old)).vlrouter_version == "0.1.0"


def test_a_head_file_that_is_a_folder_is_named_as_such(tmp_path):
    folder = _router(tmp_path / "r", 4, 1.0)
    (folder / "head.safetensors").unlink()
    (folder / "head.safetensors").mkdir()
    with pytest.raises(CheckpointError,
                       match=r"head .*head\.safetensors is a folder, not a regular file \(fix: retrain"):
        load_router(folder)


def test_the_lock_is_free_again_after_a_run_for_the_next_one_in_the_same_process(tmp_path):
    from vlrouter.core.errors import LockHeldError

    router_dir = tmp_path / "runs" / "router"
    first = RouterLock(router_dir)  # still referenced: only release() frees it
    with first, pytest.raises(LockHeldError):
        RouterLock(router_dir).__enter__()
    with RouterLock(router_dir):  # e.g. `router retrain` twice from one Python session
        pass
