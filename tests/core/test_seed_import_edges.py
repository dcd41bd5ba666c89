"""`router import-seed-head` on odd seed checkpoints: non-tensor entries, non-finite biases, no bias."""

from __future__ import annotations

import pytest
import torch

from vlrouter.core.errors import CheckpointError
from vlrouter.core.seed_import import import_seed_head
from vlrouter.core.store import load_router

ADAPTERS = ["calendar", "claim-window", "provider-select"]


def _save(path, state) -> str:
    torch.save({"state_dict": state, "adapters": ADAPTERS, "base_model_id": "Qwen/Qwen3-VL-8B-Instruct"}, path)
    return str(path)


def test_a_state_dict_entry_that_is_not_a_tensor_is_named(tmp_path):
    lin = torch.nn.Linear(8, 3)
    pt = _save(tmp_path / "h.pt", {**lin.state_dict(), "step": 3})
    with pytest.raises(CheckpointError, match="'step' is not a named tensor"):
        import_seed_head(pt, tmp_path / "out", pooling="mean")


def test_a_non_finite_bias_is_refused(tmp_path):
    lin = torch.nn.Linear(8, 3)
    state = {k: v.clone() for k, v in lin.state_dict().items()}
    state["bias"][1] = float("nan")
    with pytest.raises(CheckpointError, match="not finite"):
        import_seed_head(_save(tmp_path / "h.pt", state), tmp_path / "out", pooling="mean")


def test_a_head_without_bias_imports_with_zero_bias(tmp_path):
    lin = torch.nn.Linear(8, 3, bias=False)
    out = import_seed_head(_save(tmp_path / "h.pt", lin.state_dict()), tmp_path / "out", pooling="last")
    head, meta = load_router(out)
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(head(x), lin(x))
    assert meta.adapters == ADAPTERS and meta.pooling == ["last"]


def test_the_output_folder_may_be_nested_in_folders_that_do_not_exist_yet(tmp_path):
    out = import_seed_head(_save(tmp_path / "h.pt", torch.nn.Linear(8, 3).state_dict()),
                           tmp_path / "runs" / "imported" / "router", pooling="mean")
    assert load_router(out)[1].adapters == ADAPTERS


@pytest.mark.parametrize(("obj", "shown"), [({"step": 3, "lr": 0.1}, "keys ['lr', 'step']"), ([1, 2], "list")])
def test_something_else_than_a_seed_checkpoint_says_what_it_is(tmp_path, obj, shown):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=rf"not a seed router checkpoint \({shown}".replace("[", r"\[")):
        import_seed_head(tmp_path / "x.pt", tmp_path / "out", pooling="mean")


def _mlp_state(first: str, second: str):
    """Two Linear layers (16 -> 8 -> 3) under the module names ``first`` and ``second`` ("" = top level)."""
    torch.manual_seed(2)
    a, b = torch.nn.Linear(16, 8), torch.nn.Linear(8, 3)
    state = {}
    for name, lin in ((first, a), (second, b)):
        state.update({(f"{name}." if name else "") + k: v for k, v in lin.state_dict().items()})
    return state, lambda x: b(torch.nn.functional.gelu(a(x)))


@pytest.mark.parametrize(("first", "second"), [("2", "10"), ("", "1"), ("", "0")],
                         ids=["numbered-past-9", "top-level-then-1", "top-level-then-0"])
def test_layers_are_taken_in_module_order_top_level_first_then_by_number(tmp_path, first, second):
    """``2`` comes before ``10`` (numbers, not strings), and a top-level Linear before any numbered one."""
    state, seed = _mlp_state(first, second)
    out = import_seed_head(_save(tmp_path / "h.pt", state), tmp_path / "out", pooling="mean")
    head, meta = load_router(out)
    assert (meta.head.kind, meta.head.in_dim, meta.head.hidden, meta.head.num_labels) == ("mlp", 16, 8, 3)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(head(x), seed(x))


def test_an_existing_empty_folder_is_written_into_and_a_file_there_is_refused(tmp_path):
    from vlrouter.core.errors import InputError

    pt = _save(tmp_path / "h.pt", torch.nn.Linear(8, 3).state_dict())
    (tmp_path / "empty").mkdir()
    assert load_router(import_seed_head(pt, tmp_path / "empty", pooling="mean"))[1].adapters == ADAPTERS
    (tmp_path / "file").write_text("mine")
    with pytest.raises(InputError, match=r"file: already exists and is not an empty folder; nothing was written "
                                         r"\(fix: choose a new --out folder\)"):
        import_seed_head(pt, tmp_path / "file", pooling="mean")
    assert (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "h.pt"]  # no temp folder left


def test_the_imported_router_folder_is_readable_by_others_like_any_router_folder(tmp_path):
    import stat

    out = import_seed_head(_save(tmp_path / "h.pt", torch.nn.Linear(8, 3).state_dict()), tmp_path / "r",
                           pooling="mean")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0o700: a server under another user reads it


def test_a_router_that_does_not_load_back_is_never_put_in_place(tmp_path, monkeypatch):
    from vlrouter.core import seed_import

    real = seed_import.save_router

    def lossy(folder, head, meta):  # a write that lost the weights' tail (full disk, flaky mount)
        real(folder, head, meta)
        weights = folder / "head.safetensors"
        weights.write_bytes(weights.read_bytes()[:-16])

    monkeypatch.setattr(seed_import, "save_router", lossy)
    with pytest.raises(CheckpointError):
        import_seed_head(_save(tmp_path / "h.pt", torch.nn.Linear(8, 3).state_dict()), tmp_path / "out",
                         pooling="mean")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.pt"]  # neither the router nor its temp folder


def test_the_write_error_reaches_the_user_even_when_the_temp_folder_is_already_gone(tmp_path, monkeypatch):
    import shutil

    from vlrouter.core import seed_import

    def vanishing(folder, head, meta):  # the temp folder removed meanwhile (a cleaner), then the write fails
        shutil.rmtree(folder)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(seed_import, "save_router", vanishing)
    with pytest.raises(OSError, match="No space left on device"):
        import_seed_head(_save(tmp_path / "h.pt", torch.nn.Linear(8, 3).state_dict()), tmp_path / "out",
                         pooling="mean")
    assert not (tmp_path / "out").exists()


def _seed(path, state, **fields):
    torch.save({"state_dict": state, "adapters": ADAPTERS, "base_model_id": "Qwen/Qwen3-VL-8B-Instruct", **fields},
               path)
    return path


def test_a_two_layer_head_without_biases_imports_as_the_mlp_it_is(tmp_path):
    torch.manual_seed(3)
    seq = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False), torch.nn.GELU(), torch.nn.Linear(8, 3, bias=False))
    out = import_seed_head(_seed(tmp_path / "h.pt", seq.state_dict()), tmp_path / "out", pooling="mean")
    head, meta = load_router(out)
    assert (meta.head.kind, meta.head.hidden, meta.temperature) == ("mlp", 8, 1.0)
    assert "GELU is assumed" in meta.metrics["note"]
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(head(x), seq(x))
    lin = import_seed_head(_seed(tmp_path / "l.pt", torch.nn.Linear(16, 3).state_dict()), tmp_path / "lin",
                           pooling="mean")
    assert "note" not in load_router(lin)[1].metrics  # one Linear: nothing assumed


def test_the_seeds_numbers_are_kept_as_plain_floats_when_they_are_numbers(tmp_path):
    pt = _seed(tmp_path / "h.pt", torch.nn.Linear(8, 3).state_dict(), best_loss=torch.tensor(0.25),
               best_acc=torch.tensor([0.5]))
    m = load_router(import_seed_head(pt, tmp_path / "a", pooling="mean"))[1].metrics
    assert (m["seed_best_loss"], m["seed_best_acc"]) == (0.25, 0.5)  # one-element tensors, as the seed saved them
    pt = _seed(tmp_path / "i.pt", torch.nn.Linear(8, 3).state_dict(), best_loss=torch.tensor([0.1, 0.2]),
               best_acc=True)
    m = load_router(import_seed_head(pt, tmp_path / "b", pooling="mean"))[1].metrics
    assert (m["seed_best_loss"], m["seed_best_acc"]) == (None, None)  # neither a number nor a flag passes for one
    assert "seed_adapters" not in m and m["needs_retraining"] is True


def test_names_given_instead_of_the_seeds_are_recorded_beside_them(tmp_path):
    pt = _seed(tmp_path / "h.pt", torch.nn.Linear(8, 3).state_dict())
    meta = load_router(import_seed_head(pt, tmp_path / "out", pooling="mean", adapters=["a-1", " b-2", "c-3 "]))[1]
    assert meta.adapters == ["a-1", "b-2", "c-3"] and meta.metrics["seed_adapters"] == ADAPTERS
    torch.save({"state_dict": torch.nn.Linear(8, 2).state_dict()}, tmp_path / "bare.pt")  # no names in the file
    meta = load_router(import_seed_head(tmp_path / "bare.pt", tmp_path / "bare", pooling="mean", base_model="m",
                                        adapters=["a", "b"]))[1]
    assert meta.metrics["seed_adapters"] is None and meta.base_model == "m"


@pytest.mark.parametrize(("fields", "kwargs", "error", "message"), [
    ({"adapters": ["calendar", 3, "search"]}, {}, "InputError",
     "adapters: the checkpoint has no adapter name list (fix: pass --adapters a,b,c in label order)"),
    ({"adapters": "calendar,search,settings"}, {}, "InputError", "adapters: the checkpoint has no adapter name list"),
    ({}, {"adapters": ["calendar", "calendar", "search"]}, "InputError", "must be distinct and match [a-z0-9]"),
    ({}, {"adapters": ["calendar", "Search", "x"]}, "InputError", "must be distinct and match [a-z0-9][a-z0-9-]*"),
    ({"base_model_id": None}, {}, "InputError",
     "base_model_id: the checkpoint names no base model (fix: pass --base-model, e.g. Qwen/Qwen3-VL-8B-Instruct)"),
    ({"base_model_id": "  "}, {}, "InputError", "base_model_id: the checkpoint names no base model"),
    ({"state_dict": {}}, {}, "CheckpointError", "state_dict: missing or empty (fix: point at the seed's router-head"),
    ({"state_dict": [1, 2]}, {}, "CheckpointError", "state_dict: missing or empty"),
], ids=["name-not-a-string", "names-not-a-list", "duplicate-name", "bad-name", "no-base-model", "blank-base-model",
        "empty-state", "state-not-a-dict"])
def test_what_the_checkpoint_lacks_is_named_with_the_fix_and_nothing_is_written(tmp_path, fields, kwargs, error,
                                                                                message):
    from vlrouter.core import errors

    pt = _seed(tmp_path / "h.pt", torch.nn.Linear(8, 3).state_dict(), **fields)
    with pytest.raises(getattr(errors, error)) as e:
        import_seed_head(pt, tmp_path / "out", pooling="mean", **kwargs)
    assert message in str(e.value) and str(e.value).startswith(str(pt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.pt"]


def test_torchs_advice_to_unpickle_is_cut_from_the_detail_shown():
    """The weights-only loader's errors end with advice to retry with weights_only=False (which runs the pickle's
    code): the detail shown stops before it, on one line, at most 200 characters."""
    from vlrouter.core.seed_import import _safe_detail

    assert _safe_detail("invalid load key, 'x'.\n Weights only load failed. Re-running `torch.load` with "
                        "`weights_only` set to `False` will likely succeed") == "invalid load key, 'x'"
    assert _safe_detail("Weights only load failed. In PyTorch 2.6 ...") == "not a weights-only checkpoint"
    assert _safe_detail("  \n ") == "not a weights-only checkpoint"
    assert _safe_detail("y" * 300 + " weights_only=False") == "y" * 200
