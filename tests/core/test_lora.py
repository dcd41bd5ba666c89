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


def test_missing_keys_of_embedding_loras_are_the_adapters_own_too():
    """peft's embedding LoRA keeps its matrices in a ParameterDict: the key ends with the adapter's name."""
    keys = ["base_model.model.embed_tokens.lora_embedding_A.emb", "base_model.model.embed_tokens.lora_embedding_B.emb",
            "base_model.model.embed_tokens.lora_embedding_A.emb-2"]
    assert missing_for("emb", keys) == keys[:2]
    assert missing_for("emb", ["lora_A"]) == []  # no segment after lora_A: nobody's


def test_load_adapters_gives_a_frozen_model_in_eval_mode_and_knows_which_adapters_touch_vision(tmp_path,
                                                                                            tiny_model_dir):
    import torch
    from transformers import AutoModelForImageTextToText

    from vlrouter.core.lora import vision_adapters

    cks = H.make_lora_adapters(tiny_model_dir, tmp_path, ["calendar"])
    cks |= H.make_lora_adapters(tiny_model_dir, tmp_path, ["vis"], target_modules=H.VISION_TARGETS)
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_model_dir), dtype=torch.float32).train()
    assert any(p.requires_grad for p in base.parameters())  # a model as a training script holds it
    model = load_adapters(base, [AdapterSource(n, cks[n]) for n in ("calendar", "vis")])
    assert not any(p.requires_grad for p in model.parameters()) and not any(m.training for m in model.modules())
    assert vision_adapters(model) == {"vis"}


def test_peft_warnings_stay_visible_except_the_ones_vlrouter_handles_itself(tmp_path, tiny_model_dir, monkeypatch):
    import warnings

    from peft import PeftModel

    from vlrouter.core.encoder import load_base_model

    real = PeftModel.from_pretrained

    def chatty(*args, **kwargs):
        warnings.warn("peft: this LoRA config is unusual", UserWarning, stacklevel=2)
        warnings.warn("adapter name should not be contained in the prefix", UserWarning, stacklevel=2)  # checked
        warnings.warn("`foo` is deprecated", FutureWarning, stacklevel=2)  # library-internal deprecations
        warnings.warn("`bar` is deprecated", DeprecationWarning, stacklevel=2)
        return real(*args, **kwargs)

    monkeypatch.setattr(PeftModel, "from_pretrained", chatty)
    cks = H.make_lora_adapters(tiny_model_dir, tmp_path, ["calendar"])
    base = load_base_model(str(tiny_model_dir), device="cpu")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_adapters(base, [AdapterSource("calendar", cks["calendar"])])
    mine = {"peft: this LoRA config is unusual", "adapter name should not be contained in the prefix",
            "`foo` is deprecated", "`bar` is deprecated"}
    assert [str(w.message) for w in seen if str(w.message) in mine] == ["peft: this LoRA config is unusual"]
    assert next(w for w in seen if "unusual" in str(w.message)).category is UserWarning


def test_an_adapter_loaded_after_the_last_one_was_deleted_is_the_active_one_and_frozen(tmp_path, tiny_model_dir):
    """peft keeps naming a deleted last adapter as active; the next load must not leave a dangling name behind."""
    import torch

    from vlrouter.core.encoder import load_base_model
    from vlrouter.core.lora import delete_adapter, load_adapter

    cks = H.make_lora_adapters(tiny_model_dir, tmp_path, ["calendar", "claim-window"])
    model = load_adapters(load_base_model(str(tiny_model_dir), device="cpu"),
                          [AdapterSource("calendar", cks["calendar"])])
    delete_adapter(model, "calendar")
    load_adapter(model, AdapterSource("claim-window", cks["claim-window"]))
    assert model.active_adapter == "claim-window" and list(model.peft_config) == ["claim-window"]
    assert model.get_base_model() is not None  # raised KeyError: 'calendar'
    assert not any(p.requires_grad for p in model.parameters())
    with torch.inference_mode():
        assert model(input_ids=torch.tensor([[5, 9, 14]])).logits.isfinite().all()


def _without_one_weight(src, dst):
    """A copy of checkpoint ``src`` whose safetensors lacks one LoRA matrix (a half-written save)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "adapter_model.safetensors"))
    weights.pop(sorted(weights)[0])
    save_file(weights, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize("position", [0, 1], ids=["first-adapter", "second-adapter"])
def test_a_checkpoint_lacking_weights_is_refused_even_where_warnings_are_ignored(tmp_path, tiny_model_dir, position):
    """peft only *warns* about missing adapter keys (first adapter) or lists them (the others); a script running
    with warnings ignored (``python -W ignore``) must still not get an adapter with random weights."""
    import warnings

    from vlrouter.core.encoder import load_base_model

    cks = H.make_lora_adapters(tiny_model_dir, tmp_path, ["calendar", "claim-window"])
    names = ["calendar", "claim-window"]
    cks[names[position]] = _without_one_weight(cks[names[position]], tmp_path / "broken")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelLoadError, match=rf"adapter '{names[position]}' \(.*broken\) lacks weights for "
                                                 r"modules the config targets: .*\(fix: re-save the adapter"):
            load_adapters(load_base_model(str(tiny_model_dir), device="cpu"), [AdapterSource(n, cks[n]) for n in names])


@pytest.mark.parametrize("position", [0, 1], ids=["first-adapter", "second-adapter"])
def test_a_load_failing_inside_torch_names_the_adapter_and_the_first_line_of_the_error(tmp_path, tiny_model_dir,
                                                                                       monkeypatch, position):
    from peft import PeftModel

    from vlrouter.core.encoder import load_base_model
    from vlrouter.core.lora import load_adapter

    names = ["calendar", "claim-window"]
    cks = H.make_lora_adapters(tiny_model_dir, tmp_path, names)
    real = PeftModel.load_adapter

    def out_of_memory(self, model_id, adapter_name, *args, **kwargs):  # peft's from_pretrained loads through it too
        if adapter_name == names[position]:
            raise RuntimeError("CUDA error: out of memory")
        return real(self, model_id, adapter_name, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "load_adapter", out_of_memory)
    name = names[position]
    expected = rf"adapter '{name}' \(.*{name}\) does not fit the base model: CUDA error: out of memory \(fix: "
    with pytest.raises(ModelLoadError, match=expected):
        load_adapters(load_base_model(str(tiny_model_dir), device="cpu"), [AdapterSource(n, cks[n]) for n in names])
    if position:  # one more adapter into a running model: the same message
        model = load_adapters(load_base_model(str(tiny_model_dir), device="cpu"), [AdapterSource(n, cks[n])
                                                                                    for n in names[:1]])
        with pytest.raises(ModelLoadError, match=expected):
            load_adapter(model, AdapterSource(names[1], cks[names[1]]))


def test_swapping_adapters_in_a_running_model_shows_no_library_warnings(tmp_path, tiny_model_dir, monkeypatch):
    """An on-demand load or an eviction under a serving engine must not print peft's deprecation notices or its
    "Adapter X was active which is now deleted" (the engine activates adapters itself)."""
    import warnings

    from peft import PeftModel

    from vlrouter.core.encoder import load_base_model
    from vlrouter.core.lora import delete_adapter, load_adapter

    cks = H.make_lora_adapters(tiny_model_dir, tmp_path, ["calendar", "claim-window"])
    model = load_adapters(load_base_model(str(tiny_model_dir), device="cpu"), [AdapterSource("calendar",
                                                                                            cks["calendar"])])
    real = PeftModel.load_adapter

    def deprecated(self, *args, **kwargs):
        warnings.warn("`torch_device` is deprecated", FutureWarning, stacklevel=2)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "load_adapter", deprecated)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_adapter(model, AdapterSource("claim-window", cks["claim-window"]))
        model.set_adapter("calendar")
        delete_adapter(model, "calendar")  # the active one
    assert [str(w.message) for w in seen if "deprecated" in str(w.message) or "active" in str(w.message)] == []
    assert list(model.peft_config) == ["claim-window"]


def test_a_checkpoint_stamp_changes_when_a_file_is_rewritten_in_place(tmp_path, tiny_model_dir):
    import os

    from vlrouter.core.lora import checkpoint_stamp

    ck = H.make_lora_adapters(tiny_model_dir, tmp_path, ["calendar"])["calendar"]
    first = checkpoint_stamp(ck)
    assert first == checkpoint_stamp(ck) and first[0] == os.path.realpath(ck)
    assert [f[0] for f in first[1]] == ["adapter_config.json", "adapter_model.safetensors"]  # no .bin: skipped
    weights = ck / "adapter_model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # retrained: same size, newer file
    assert checkpoint_stamp(ck) != first


def test_a_rank_that_does_not_match_the_weights_names_the_size_mismatch_not_torchs_preamble(tmp_path, tiny_model_dir):
    from vlrouter.core.encoder import load_base_model

    ck = H.make_lora_adapters(tiny_model_dir, tmp_path, ["calendar"])["calendar"]
    cfg = json.loads((ck / "adapter_config.json").read_text())
    (ck / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2 * cfg["r"]}))  # says rank 8, holds rank 4
    with pytest.raises(ModelLoadError) as e:
        load_adapters(load_base_model(str(tiny_model_dir), device="cpu"), [AdapterSource("calendar", ck)])
    assert "adapter 'calendar' (" in str(e.value)
    assert "does not fit the base model: size mismatch for base_model.model." in str(e.value)
    assert "Error(s) in loading state_dict" not in str(e.value)
