"""Vision features reused within one engine call: the same screenshot is encoded once, another one never
gets its features, and the model is left as it was."""

from __future__ import annotations

import torch
from PIL import Image

from vlrouter.core.views import inner_vl_model
from vlrouter.core.vision import reuse_image_features


def _batch(enc, colour):
    return enc.prepare([Image.new("RGB", (64, 64), colour)], ["Click the button"])


def test_the_same_screenshot_is_encoded_once_and_another_one_of_the_same_size_again(tiny_encoder):
    inner = inner_vl_model(tiny_encoder.model)
    red, blue = _batch(tiny_encoder, (255, 0, 0)), _batch(tiny_encoder, (0, 0, 255))
    fresh_red = inner.get_image_features(red["pixel_values"], red["image_grid_thw"])
    fresh_blue = inner.get_image_features(blue["pixel_values"], blue["image_grid_thw"])
    with reuse_image_features(inner) as state:
        first = inner.get_image_features(red["pixel_values"], red["image_grid_thw"])
        again = inner.get_image_features(red["pixel_values"], red["image_grid_thw"].clone())  # equal grid
        assert state["vision_calls"] == 1
        other = inner.get_image_features(blue["pixel_values"], blue["image_grid_thw"])  # same grid, other pixels
        assert state["vision_calls"] == 2
    torch.testing.assert_close(again.pooler_output, first.pooler_output)
    torch.testing.assert_close(first.pooler_output, fresh_red.pooler_output)
    torch.testing.assert_close(other.pooler_output, fresh_blue.pooler_output)
    assert "get_image_features" not in inner.__dict__  # the model's own method again


def test_disabled_reuse_encodes_every_time_and_a_consumer_cannot_change_the_cache(tiny_encoder):
    inner = inner_vl_model(tiny_encoder.model)
    red = _batch(tiny_encoder, (255, 0, 0))
    args = red["pixel_values"], red["image_grid_thw"]
    with reuse_image_features(inner) as state:
        first = inner.get_image_features(*args)
        depth = len(first.deepstack_features)
        first.deepstack_features.clear()  # what a consumer that edits its output in place does
        assert len(inner.get_image_features(*args).deepstack_features) == depth
        state["enabled"] = False  # e.g. an adapter with LoRA weights in the vision tower
        inner.get_image_features(*args)
        inner.get_image_features(*args)
        assert state["vision_calls"] == 3


def test_a_get_image_features_patched_on_the_instance_before_is_put_back(tiny_encoder):
    inner = inner_vl_model(tiny_encoder.model)
    red = _batch(tiny_encoder, (255, 0, 0))
    seen = []
    own = inner.get_image_features

    def watched(pixel_values, image_grid_thw=None, **kwargs):  # e.g. a profiler's wrapper, set on the instance
        seen.append(1)
        return own(pixel_values, image_grid_thw, **kwargs)

    inner.get_image_features = watched
    try:
        with reuse_image_features(inner) as state:
            inner.get_image_features(red["pixel_values"], red["image_grid_thw"])
            assert state["vision_calls"] == 1 and seen == [1]
        assert inner.__dict__["get_image_features"] is watched  # that wrapper again, not the class method
    finally:
        inner.__dict__.pop("get_image_features", None)
