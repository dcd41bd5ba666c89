"""Base model sizes for the GPU check: counted from a local folder's safetensors headers, else the published sizes."""

from __future__ import annotations

import pytest

from vlrouter.core.model_size import parameter_count, weight_bytes


@pytest.mark.parametrize("hub_id,params", [("Qwen/Qwen3-VL-8B-Instruct", 8.77e9), ("Qwen/Qwen3-VL-2B-Thinking", 2.13e9),
                                           ("Qwen/Qwen3-VL-235B-A22B-Instruct", 236e9),
                                           ("Qwen/Qwen3-VL-30B-A3B-Instruct", 31.1e9),
                                           ("Qwen/Qwen3-VL-32B-Instruct", 33.4e9),
                                           ("Qwen/Qwen3-VL-4B-Instruct", 4.44e9)])
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


def _weights_with_header(folder, header: bytes, length: int | None = None) -> None:
    import struct

    n = len(header) if length is None else length
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", n) + header)


@pytest.mark.parametrize("content", [b"", b"\x05\x00", b"{", b"[]", b"7", b"\xff\xfe", b'{"a": 1}'],
                         ids=["empty", "short", "not-json", "a-list", "a-number", "not-utf8", "no-shape"])
def test_a_weights_file_without_a_safetensors_header_skips_the_check_and_names_the_file(tmp_path, content):
    if content in (b"", b"\x05\x00"):
        (tmp_path / "model.safetensors").write_bytes(content)  # e.g. a download cut short
    else:
        _weights_with_header(tmp_path, content)
    size, why = parameter_count(str(tmp_path))  # was: struct.error / AttributeError out of `router retrain`
    assert size is None and why.startswith("cannot read the safetensors headers (")
    if content != b'{"a": 1}':
        assert why == f"cannot read the safetensors headers ({tmp_path / 'model.safetensors'}: not a safetensors file)"


def test_a_header_of_exactly_the_size_limit_is_read_and_one_byte_more_is_refused(tmp_path, monkeypatch):
    import json

    import vlrouter.core.model_size as model_size

    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    assert model_size.MAX_HEADER == 100 << 20  # 100 MiB; checked below at a small size
    monkeypatch.setattr(model_size, "MAX_HEADER", len(header))
    _weights_with_header(tmp_path, header)
    assert parameter_count(str(tmp_path))[0] == 6.0
    _weights_with_header(tmp_path, header + b" ", length=len(header) + 1)
    assert "not a safetensors file" in parameter_count(str(tmp_path))[1]


@pytest.mark.parametrize("name", ["Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-4B-Instruct/",
                                  "mirror/Qwen/Qwen3-VL-4B-Instruct", "hf.example.com/Qwen/qwen3-vl-4b-thinking"])
def test_the_size_is_looked_up_by_the_last_part_of_the_id_in_any_case(name):
    assert parameter_count(name) == (4.44e9, "the published size of qwen3-vl-4b (approximate)")


def test_half_precision_and_auto_take_two_bytes_a_parameter():
    for dtype in ("bfloat16", "float16", "auto"):  # auto: bfloat16, what a GPU runs
        assert weight_bytes("Qwen/Qwen3-VL-8B-Instruct", dtype)[0] == int(2 * 8.77e9), dtype


def test_a_folder_without_weights_skips_the_check_and_says_so(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert parameter_count(str(tmp_path)) == (None, f"{tmp_path} holds no *.safetensors")
