"""The screenshot is encoded once per call: the routing pass's vision features are handed to generation.

Qwen3-VL's inner model calls ``get_image_features`` both in its ``forward`` (the routing
pass) and in ``generate`` before prefill. :func:`reuse_image_features` wraps it for the
duration of one engine call with a cache keyed by the ``pixel_values`` tensor's identity
and the image grid, so the second call returns the first one's output (deepstack
features included) instead of running the vision tower again.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def reuse_image_features(inner) -> Iterator[dict]:
    """During one call, hand the vision features of the routing pass to the generation pass.

    ``inner`` is the ``Qwen3VLModel`` (:func:`vlrouter.core.views.inner_vl_model`). The
    yielded dict holds ``enabled`` (set it False to make the next pass encode the image
    again: an adapter with LoRA weights in the vision tower sees another tower) and
    ``vision_calls`` (vision-tower forwards so far).
    """
    import torch

    had_own = "get_image_features" in inner.__dict__
    original = inner.get_image_features
    state: dict[str, Any] = {"enabled": True, "entries": [], "vision_calls": 0}

    @functools.wraps(original)
    def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
        if state["enabled"]:
            for pv, grid, out in state["entries"]:
                if pv is pixel_values and (grid is image_grid_thw or (
                        grid is not None and image_grid_thw is not None and torch.equal(grid, image_grid_thw))):
                    return _copy_output(out)
        out = original(pixel_values, image_grid_thw, **kwargs)
        state["vision_calls"] += 1
        if state["enabled"]:
            state["entries"].append((pixel_values, image_grid_thw, out))
            return _copy_output(out)
        return out

    inner.get_image_features = get_image_features
    try:
        yield state
    finally:
        if had_own:
            inner.get_image_features = original
        else:
            del inner.get_image_features


def _copy_output(out):
    """A shallow copy of a vision output, so a consumer that reassigns its fields cannot change the cache."""
    new = copy.copy(out)
    for key in ("pooler_output", "deepstack_features"):
        v = getattr(out, key, None)
        if isinstance(v, list):
            setattr(new, key, list(v))
    return new
