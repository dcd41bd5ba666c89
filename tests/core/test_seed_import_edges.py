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
