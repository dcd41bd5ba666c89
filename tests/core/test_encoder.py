"""The frozen encoder: from_pretrained round-trip, pooling, padding invariance."""

from __future__ import annotations

import torch
from PIL import Image

from vlrouter.core.encoder import Encoder, build_inputs, inner_vl_model, pool_hidden


def _images():
    return [Image.new("RGB", (320, 240), c) for c in [(255, 0, 0), (0, 160, 0), (20, 20, 200)]]


PROMPTS = ["Click March 29 in the calendar", "Select Dr. Smith from the provider list", "Submit"]


def test_tiny_model_round_trips_through_from_pretrained(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    enc = Encoder.load(str(tiny_model_dir), device="cpu")
    batch = enc.prepare(_images()[:1], PROMPTS[:1])
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(batch)
    n_image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == int(batch["image_grid_thw"].prod()) // 4
    out = inner_vl_model(enc.model)(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert out.hidden_states[-1].shape[-1] == enc.hidden_size


def test_pooled_features_differ_across_inputs(tiny_encoder):
    feats = tiny_encoder.embed(_images(), PROMPTS)
    assert feats.shape == (3, tiny_encoder.hidden_size)
    assert feats.dtype == torch.float32
    dists = torch.cdist(feats, feats)
    assert (dists[~torch.eye(3, dtype=torch.bool)] > 1e-3).all()


def test_token_zero_is_identical_for_every_input(tiny_encoder):
    """Why vlrouter never pools token 0 (the seed's choice): causal attention makes it constant."""
    firsts = []
    for img, prompt in zip(_images(), PROMPTS):
        batch = tiny_encoder.prepare([img], [prompt])  # one at a time: no padding in front
        out = inner_vl_model(tiny_encoder.model)(**batch, output_hidden_states=True)
        firsts.append(out.hidden_states[-1][0, 0])
    for f in firsts[1:]:
        torch.testing.assert_close(f, firsts[0], rtol=0, atol=0)


def test_batched_equals_single_with_left_padding(tiny_encoder):
    for pooling in ("mean", "last"):
        enc = Encoder(tiny_encoder.model, tiny_encoder.processor, tiny_encoder.base_model, pooling=pooling)
        batch = enc.prepare(_images(), PROMPTS)
        assert (batch["attention_mask"][:, 0] == 0).any(), "prompts of different length must pad on the left"
        batched = enc.embed_prepared(batch)
        single = torch.cat([enc.embed([i], [p]) for i, p in zip(_images(), PROMPTS)])
        torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_pool_hidden_handles_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(pool_hidden(hidden, left, "last")[0], hidden[0, 3])
    torch.testing.assert_close(pool_hidden(hidden, right, "last")[0], hidden[0, 1])
    torch.testing.assert_close(pool_hidden(hidden, left, "mean")[0], hidden[0, 2:].mean(0))
    torch.testing.assert_close(pool_hidden(hidden, right, "mean")[0], hidden[0, :2].mean(0))


def test_empty_prompt_is_refused(tiny_encoder):
    import pytest

    from vlrouter.core.errors import InputError

    with pytest.raises(InputError, match="empty"):
        build_inputs(tiny_encoder.processor, _images()[:1], ["   "])
