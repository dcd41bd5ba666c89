"""The encoder fingerprint that keys the feature cache: a local base model is identified by its files."""

from __future__ import annotations

import os
import shutil

from vlrouter.core.encoder import model_fingerprint, processor_fingerprint


def test_replacing_a_local_models_weights_changes_its_fingerprint(tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "base")
    before = model_fingerprint(str(model))
    assert model_fingerprint(str(model)) == before  # stable
    weights = sorted(model.glob("*.safetensors"))[0]
    st = weights.stat()
    weights.write_bytes(weights.read_bytes())  # retrained in place: same name, new file
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert model_fingerprint(str(model)) != before  # cached features of the old weights are not reused


def test_a_local_models_config_is_part_of_its_fingerprint(tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "base")
    before = model_fingerprint(str(model))
    cfg = model / "config.json"
    cfg.write_text(cfg.read_text().replace("{", '{"_note": "edited", ', 1))
    assert model_fingerprint(str(model)) != before


def test_a_hub_models_fingerprint_names_its_revision():
    assert model_fingerprint("Qwen/Qwen3-VL-8B-Instruct") == model_fingerprint("Qwen/Qwen3-VL-8B-Instruct", "main")
    assert model_fingerprint("Qwen/Qwen3-VL-8B-Instruct") != model_fingerprint("Qwen/Qwen3-VL-8B-Instruct", "abc123")
    assert model_fingerprint("Qwen/Qwen3-VL-8B-Instruct") != model_fingerprint("Qwen/Qwen3-VL-2B-Instruct")


def test_the_processor_fingerprint_follows_what_the_model_sees(tiny_encoder):
    import copy

    proc = tiny_encoder.processor
    fp = processor_fingerprint(proc)
    assert isinstance(fp, str) and len(fp) >= 8 and processor_fingerprint(copy.deepcopy(proc)) == fp
    smaller = copy.deepcopy(proc)
    smaller.image_processor.size = {**dict(proc.image_processor.size), "longest_edge": 128 * 128}
    assert processor_fingerprint(smaller) != fp  # another pixel budget: other features
    patches = copy.deepcopy(proc)
    patches.image_processor.patch_size = proc.image_processor.patch_size * 2
    assert processor_fingerprint(patches) != fp
    templated = copy.deepcopy(proc)
    templated.chat_template = (proc.chat_template or "") + "{# changed #}"
    assert processor_fingerprint(templated) != fp  # another prompt format: other features


def test_an_encoders_fingerprint_is_stable_across_releases():
    """A changed fingerprint re-embeds every feature cache (hours on an 8B model): it changes only on purpose.

    When the entry format or what the fingerprint covers changes, bump FEATURES_FORMAT and update this value."""
    from types import SimpleNamespace

    import torch

    from vlrouter.core.encoder import Encoder

    vision = SimpleNamespace(spatial_merge_size=2)
    config = SimpleNamespace(image_token_id=1, vision_end_token_id=2, vision_config=vision)
    model = SimpleNamespace(config=config, parameters=lambda: iter([torch.zeros(1, dtype=torch.bfloat16)]))
    processor = SimpleNamespace(tokenizer=SimpleNamespace(convert_tokens_to_ids=lambda token: 3),
                                image_processor=SimpleNamespace(to_dict=lambda: {"patch_size": 16, "merge_size": 2}),
                                chat_template="{{ messages }}")
    encoder = Encoder(model=model, processor=processor, base_model="Qwen/Qwen3-VL-8B-Instruct")
    assert encoder.fingerprint() == "2cdb137a1955518a"
