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

    (ck / "adapter_model.bin").unlink()
    weights.mkdir()  # a folder where the weights file belongs: named for what it is, never opened
    with pytest.raises(ModelLoadError, match=r"registry.yaml:9: adapters\[0\].checkpoint: adapter weights .*"
                                             r"adapter_model.safetensors is a folder, not a regular file"):
        check_adapter_checkpoint(src)


def test_the_config_must_be_json_and_a_regular_file(tmp_path, tiny_model_dir):
    ck, src = _adapter_folder(tmp_path, tiny_model_dir)
    (ck / "adapter_config.json").write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(ModelLoadError, match="is not valid JSON"):
        check_adapter_checkpoint(src)
    shutil.rmtree(ck)
    with pytest.raises(ModelLoadError, match="not found"):
        check_adapter_checkpoint(src)


def test_the_fast_switches_give_peft_own_outputs_and_leave_every_weight_frozen(tmp_path, tiny_model_dir):
    """adapters_off / activate replace peft's O(adapters x layers) switches in the engine: same logits as
    ``disable_adapter()`` / ``set_adapter``, restored afterwards, nothing made trainable."""
    import torch

    from vlrouter.core.encoder import load_base_model
    from vlrouter.core.lora import _switchable_layers, activate, adapters_off

    names = ["calendar", "claim-window", "provider-select"]
    cks = H.make_lora_adapters(tiny_model_dir, tmp_path, names)
    model = load_adapters(load_base_model(str(tiny_model_dir), device="cpu"),
                          [AdapterSource(n, cks[n]) for n in names]).eval().requires_grad_(False)  # as the engine
    assert len(_switchable_layers(model)) > 0  # the fast path, not peft's
    assert _switchable_layers(model) is _switchable_layers(model)  # walked once, kept while the adapters stay
    assert all(model.peft_config[n].inference_mode for n in names)  # loaded for inference, not for training
    ids = torch.tensor([[5, 9, 14, 3, 7, 11]])

    def logits():
        with torch.inference_mode():
            return model(input_ids=ids).logits

    with model.disable_adapter():
        base = logits()
    per = {}
    for n in names:
        model.set_adapter(n, inference_mode=True)
        per[n] = logits()
    assert not torch.allclose(per["calendar"], per["claim-window"])  # the adapters do change the output

    for n in ["provider-select", "calendar", "claim-window"]:
        activate(model, n)
        assert model.active_adapter == n and model.base_model.active_adapter == n
        torch.testing.assert_close(logits(), per[n], rtol=0, atol=0)
        with adapters_off(model):
            torch.testing.assert_close(logits(), base, rtol=0, atol=0)
            assert model.get_model_status().enabled is False
        torch.testing.assert_close(logits(), per[n], rtol=0, atol=0)  # switched back on, the same adapter
    assert not any(p.requires_grad for p in model.parameters())

    with pytest.raises(ValueError, match="not found"):
        activate(model, "missing")  # peft's own error for an unknown adapter

    model.base_model.model.lm_head.requires_grad_(True)  # a model that trains: peft's own switches, same result
    next(m for m in model.modules() if hasattr(m, "lora_A")).lora_A["calendar"].requires_grad_(True)
    model.__dict__.pop("_vlrouter_switchable", None)
    assert _switchable_layers(model) is None
    activate(model, "calendar")
    with adapters_off(model):
        torch.testing.assert_close(logits(), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(), per["calendar"], rtol=0, atol=0)


def test_the_fast_switches_follow_an_adapter_replaced_with_other_target_modules(tmp_path, tiny_model_dir):
    """A reload can delete an adapter and load one of the same name that wraps other layers: routing must still
    switch every LoRA layer off (a layer the switches did not know about would stay on, silently)."""
    import torch

    from vlrouter.core.encoder import load_base_model
    from vlrouter.core.lora import adapters_off, delete_adapter, load_adapter

    first = H.make_lora_adapters(tiny_model_dir, tmp_path / "a", ["other", "calendar"], target_modules=["q_proj"])
    wider = H.make_lora_adapters(tiny_model_dir, tmp_path / "b", ["calendar"], target_modules=["q_proj", "down_proj"])
    ids = torch.tensor([[5, 9, 14, 3, 7, 11]])
    plain = load_base_model(str(tiny_model_dir), device="cpu").eval()
    with torch.inference_mode():
        base = plain(input_ids=ids).logits  # before peft wraps it
    model = load_adapters(plain, [AdapterSource(n, first[n]) for n in ("other", "calendar")]).requires_grad_(False)
    with torch.inference_mode(), adapters_off(model):
        torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)
    assert len(model._vlrouter_switchable[1]) == 2  # the fast path, knowing the two q_proj layers
    delete_adapter(model, "calendar")
    load_adapter(model, AdapterSource("calendar", wider["calendar"]))  # the same names, in the same order
    assert list(model.peft_config) == ["other", "calendar"]
    model.set_adapter("calendar", inference_mode=True)
    with torch.inference_mode():
        assert not torch.allclose(model(input_ids=ids).logits, base)
    with torch.inference_mode(), adapters_off(model):
        torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)
