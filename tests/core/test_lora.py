"""LoRA checkpoints: names peft would confuse load right, pickles and truncated weights are refused up front."""

from __future__ import annotations

import json
import shutil

import pytest

from tests import engine_helpers as H
from vlrouter.core.errors import ModelLoadError
from vlrouter.core.lora import AdapterSource, check_adapter_checkpoint, load_adapters, missing_for


def test_peft_missing_keys_are_filtered_to_the_adapters_own():
    keys = ["base_model.model.layers.0.q_proj.lora_A.settings-toggle.weight",
            "base_model.model.layers.0.q_proj.lora_A.settings.weight",
            "base_model.model.layers.0.q_proj.base_layer.weight"]
    assert missing_for("settings", keys) == [keys[1]]  # peft lists all three for 'settings' (substring match)
    assert missing_for("weight", keys) == []


def test_adapter_names_that_are_substrings_of_others_load_their_own_weights(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from vlrouter.core.encoder import load_base_model

    names = ["settings-toggle", "settings", "0"]
    cks = H.make_lora_adapters(tiny_model_dir, tmp_path, names)
    model = load_adapters(load_base_model(str(tiny_model_dir), device="cpu"),
                          [AdapterSource(n, cks[n]) for n in names])  # was: "lacks weights… re-save the adapter"
    state = model.state_dict()
    for n in names:
        for key, value in load_file(str(cks[n] / "adapter_model.safetensors")).items():
            assert state[key.replace(".weight", f".{n}.weight")].equal(value), (n, key)


def _adapter_folder(tmp_path, tiny_model_dir):
    ck = H.make_lora_adapters(tiny_model_dir, tmp_path, ["calendar"])["calendar"]
    return ck, AdapterSource("calendar", ck, "registry.yaml", "adapters[0].checkpoint", 9)


def test_a_pickled_or_truncated_adapter_is_refused_before_loading(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    ck, src = _adapter_folder(tmp_path, tiny_model_dir)
    weights = ck / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])  # a half-copied file
    with pytest.raises(ModelLoadError) as e:
        check_adapter_checkpoint(src)
    assert str(e.value).startswith("registry.yaml:9: adapters[0].checkpoint: adapter 'calendar': ")
    assert "damaged or truncated" in str(e.value)

    weights.write_bytes(data)
    torch.save(load_file(str(weights)), ck / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError) as e:
        check_adapter_checkpoint(src)
    msg = str(e.value)
    assert "a pickle, which can run code" in msg and "safe_serialization=True" in msg
    assert "weights_only=False" not in msg  # never suggested


def test_the_config_must_be_json_and_a_regular_file(tmp_path, tiny_model_dir):
    ck, src = _adapter_folder(tmp_path, tiny_model_dir)
    (ck / "adapter_config.json").write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(ModelLoadError, match="is not valid JSON"):
        check_adapter_checkpoint(src)
    shutil.rmtree(ck)
    with pytest.raises(ModelLoadError, match="not found"):
        check_adapter_checkpoint(src)
