"""The base model loads frozen: no parameter asks for gradients (memory, and no accidental training)."""

from __future__ import annotations

from vlrouter.core.encoder import load_base_model


def test_the_base_model_is_loaded_frozen_in_eval_mode(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_auto_dtype_is_bf16_on_gpu_and_fp32_on_cpu():
    import torch

    from vlrouter.core.encoder import resolve_dtype

    assert resolve_dtype("auto", "cuda") is torch.bfloat16 and resolve_dtype(None, "cuda:1") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16 and resolve_dtype("float16", "cuda") is torch.float16


def test_the_asked_dtype_is_the_loaded_one(tiny_model_dir):
    import torch

    model = load_base_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_models_own_chat_template_file_is_the_one_used(tmp_path, tiny_model_dir):
    import json
    import shutil

    from vlrouter.core.encoder import load_processor

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.json").unlink(missing_ok=True)
    template = "{% for m in messages %}<{{ m['role'] }}>{% endfor %}{# vlrouter test template #}"
    (folder / "chat_template.jinja").write_text(template)
    assert load_processor(str(folder)).chat_template == template
    (folder / "chat_template.jinja").unlink()  # the older processor format: a JSON file the tokenizer never reads
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert load_processor(str(folder)).chat_template == template


def test_cuda_on_a_machine_without_it_says_whether_torch_or_the_machine_lacks_it(monkeypatch):
    import pytest
    import torch

    from vlrouter.core.encoder import resolve_device
    from vlrouter.core.errors import InputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(InputError, match="'cuda': this torch build has no CUDA"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    with pytest.raises(InputError, match="'cuda': no CUDA device is visible"):
        resolve_device("cuda")


def test_a_backend_that_cannot_say_it_is_available_is_refused(monkeypatch):
    import types

    import pytest
    import torch

    from vlrouter.core.encoder import resolve_device
    from vlrouter.core.errors import InputError

    monkeypatch.setattr(torch, "xpu", types.SimpleNamespace(), raising=False)  # a backend without is_available()
    with pytest.raises(InputError, match="'xpu': not available here"):
        resolve_device("xpu")
    monkeypatch.setattr(torch, "xpu", types.SimpleNamespace(is_available=lambda: True), raising=False)
    assert resolve_device("xpu") == "xpu"


def test_quiet_loading_hides_progress_bars_and_then_restores_the_previous_setting():
    import transformers
    from huggingface_hub import utils as hub_utils

    from vlrouter.core.encoder import quiet_loading

    tf = transformers.utils.logging
    was_tf, was_hub = tf.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    try:
        for enabled in (True, False):
            (tf.enable_progress_bar if enabled else tf.disable_progress_bar)()
            (hub_utils.enable_progress_bars if enabled else hub_utils.disable_progress_bars)()
            with quiet_loading():
                assert not tf.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
            assert tf.is_progress_bar_enabled() is enabled
            assert hub_utils.are_progress_bars_disabled() is not enabled
    finally:
        (tf.enable_progress_bar if was_tf else tf.disable_progress_bar)()
        (hub_utils.enable_progress_bars if was_hub else hub_utils.disable_progress_bars)()


def test_a_cuda_index_past_the_machines_gpus_is_refused_and_the_others_pass(monkeypatch):
    import pytest
    import torch

    from vlrouter.core.encoder import resolve_device
    from vlrouter.core.errors import InputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [resolve_device(d) for d in ("cuda", "cuda:0", "cuda:1")] == ["cuda", "cuda:0", "cuda:1"]
    with pytest.raises(InputError) as e:
        resolve_device("cuda:2")
    assert str(e.value).startswith("--device: 'cuda:2': this machine has 2 CUDA device(s)") and "(fix: " in str(e.value)


def test_quiet_loading_restores_each_switch_on_its_own(monkeypatch):
    import transformers
    from huggingface_hub import utils as hub_utils

    from vlrouter.core.encoder import quiet_loading

    tf = transformers.utils.logging
    was_tf, was_hub = tf.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    try:
        tf.disable_progress_bar()  # transformers' bars off (which also turns the hub's off) ...
        hub_utils.enable_progress_bars()  # ... and the hub's back on
        with quiet_loading():
            assert hub_utils.are_progress_bars_disabled()
        assert not tf.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
    finally:
        (tf.enable_progress_bar if was_tf else tf.disable_progress_bar)()
        (hub_utils.enable_progress_bars if was_hub else hub_utils.disable_progress_bars)()


def test_auto_device_is_cuda_when_there_is_one_else_cpu(monkeypatch):
    import torch

    from vlrouter.core.encoder import resolve_device

    for available, device in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert resolve_device(None) == resolve_device("auto") == device


def test_a_local_base_model_path_that_is_not_a_folder_is_refused_before_loading(tmp_path):
    import pytest

    from vlrouter.core.encoder import load_base_model, load_processor
    from vlrouter.core.errors import ModelLoadError

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    for load in (load_base_model, load_processor):  # never handed to the Hub, which retries for minutes offline
        with pytest.raises(ModelLoadError, match="local base model folder not found"):
            load(str(tmp_path / "missing"))
        with pytest.raises(ModelLoadError, match="local base model folder is not a folder"):
            load(str(weights))


def test_the_full_processor_is_used_when_it_can_be_built_and_pads_on_the_left(monkeypatch):
    from types import SimpleNamespace

    import transformers

    from vlrouter.core.encoder import load_processor

    full = SimpleNamespace(tokenizer=SimpleNamespace(padding_side="right"))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: full)
    proc = load_processor("Qwen/Qwen3-VL-2B-Instruct")  # a hub id: nothing is downloaded here
    assert proc is full and proc.tokenizer.padding_side == "left"


def test_encoder_info_records_the_model_its_width_depth_and_fingerprint(tiny_encoder):
    import dataclasses

    import pytest

    info = tiny_encoder.info()
    assert (info.base_model, info.hidden_size, info.num_layers, info.fingerprint) == (
        tiny_encoder.base_model, tiny_encoder.hidden_size, tiny_encoder.num_layers, tiny_encoder.fingerprint())
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.hidden_size = 1  # a router records it as it was


def test_the_base_model_is_moved_to_the_resolved_device(tiny_model_dir, monkeypatch):
    import vlrouter.core.encoder as encoder

    monkeypatch.setattr(encoder, "resolve_device", lambda device: "meta")  # stands in for a GPU on this machine
    model = encoder.load_base_model(str(tiny_model_dir), device="cuda", dtype="float32")
    assert {p.device.type for p in model.parameters()} == {"meta"} and not model.training


def test_the_encoder_stops_after_the_deepest_layer_asked_for_by_default(tiny_encoder):
    from PIL import Image

    from vlrouter.core.views import inner_vl_model

    batch = tiny_encoder.prepare([Image.new("RGB", (64, 48))], ["Click Submit"])
    ran = []
    blocks = inner_vl_model(tiny_encoder.model).language_model.layers
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        tiny_encoder.embed_prepared(batch, [1])
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0]
