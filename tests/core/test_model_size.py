"""Base model sizes for the GPU check: counted from a local folder's safetensors headers, else the published sizes."""

from __future__ import annotations

import pytest

from vlrouter.core.model_size import parameter_count, weight_bytes


@pytest.mark.parametrize("hub_id,params", [("Qwen/Qwen3-VL-8B-Instruct", 8.77e9), ("Qwen/Qwen3-VL-2B-Thinking", 2.13e9),
                                           ("Qwen/Qwen3-VL-235B-A22B-Instruct", 236e9),
                                           ("Qwen/Qwen3-VL-30B-A3B-Instruct", 31.1e9)])
def test_a_hub_id_gets_its_published_size(hub_id, params):
    size, how = weight_bytes(hub_id)  # bfloat16: 2 bytes a parameter
    assert size == pytest.approx(2 * params, rel=0.01) and "published size" in how and "approximate" in how
    assert weight_bytes(hub_id, "float32")[0] == pytest.approx(4 * params, rel=0.01)


def test_a_local_folder_is_counted_and_a_damaged_header_says_why_not(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(tmp_path / "model.safetensors"))
    assert parameter_count(str(tmp_path)) == (17.0, f"counted in {tmp_path.name}/*.safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)  # a header length of 0: not a safetensors file
    size, why = parameter_count(str(tmp_path))
    assert size is None and why.startswith("cannot read the safetensors headers (") and "not a safetensors" in why
    assert weight_bytes(str(tmp_path)) == (None, why)  # the caller skips the GPU check and says why
    assert parameter_count("someone/other-model") == (None, "'someone/other-model' is not a local folder nor a "
                                                            "known Qwen3-VL size")
