"""The screenshot's layout: where its edges are, from the processor's patches -- a colour-free sketch of the screen.

A router's views are averages of hidden states; they say a lot about colours and text and
little about *structure* (a month grid, a form, a list of toggles). An unseen kind of
screen in a familiar colour scheme can then sit among the training data. The layout
view is the screenshot as the vision tower receives it (``pixel_values``: the resized,
normalised image cut into patches), put back together as one grey plane, and summarised
as edge strength on a fixed grid::

    g = mean over channels of the screenshot (first temporal frame)
    gx = |g[:, 1:] - g[:, :-1]|,  gy = |g[1:, :] - g[:-1, :]|
    layout = unit(avg_pool(gx → CELLS x CELLS) ⊕ avg_pool(gy → CELLS x CELLS))   [LAYOUT_DIM]

Unit length drops contrast and theme (dark or light), the fixed grid drops the size; a
blank screen has no edges (the zero vector). :mod:`vlrouter.core.ood` measures how far an
input's layout is from the nearest training screenshot's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vlrouter.core.errors import ModelLoadError, located

if TYPE_CHECKING:
    import torch

CELLS = 16  # the grid's cells per side
LAYOUT_DIM = 2 * CELLS * CELLS  # horizontal and vertical edge strength per cell
CHANNELS = 3


def screen_planes(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, *, patch: int, temporal: int,
                  merge: int) -> list[torch.Tensor]:
    """Each image of a batch as one grey ``[h·patch, w·patch]`` plane, from the processor's flattened patches.

    Qwen-VL processors emit patches in merge-block order, ``(t, h/m, w/m, m, m)``, each
    patch flattened as ``(channel, temporal, patch, patch)``; ``image_grid_thw`` gives
    ``t, h, w`` per image, in batch order.
    """
    per_patch = CHANNELS * temporal * patch * patch
    grids = [tuple(int(v) for v in g) for g in image_grid_thw.tolist()]
    total = sum(t * h * w for t, h, w in grids)
    if pixel_values.ndim != 2 or pixel_values.shape[1] != per_patch or pixel_values.shape[0] != total or any(
            h % merge or w % merge for _, h, w in grids):
        raise ModelLoadError(located(None, "pixel_values", f"patches of shape {tuple(pixel_values.shape)} do not "
                                     f"match image_grid_thw {grids} with {CHANNELS} channels, temporal patch "
                                     f"{temporal}, patch {patch}, merge {merge}",
                                     fix="use a Qwen-VL processor saved with the model (its patch_size, "
                                         "temporal_patch_size and merge_size must equal the model's vision_config)"))
    planes, start = [], 0
    for t, h, w in grids:
        p = pixel_values[start:start + t * h * w].float()
        start += t * h * w
        p = p.reshape(t, h // merge, w // merge, merge, merge, CHANNELS, temporal, patch, patch)
        # -> (t, channel, temporal, h/m, m, patch, w/m, m, patch): rows then columns in raster order
        image = p.permute(0, 5, 6, 1, 3, 7, 2, 4, 8).reshape(t, CHANNELS, temporal, h * patch, w * patch)
        planes.append(image[0, :, 0].mean(0))
    return planes


def edge_layout(grey: torch.Tensor, cells: int = CELLS) -> torch.Tensor:
    """A grey plane's edge strength on a ``cells`` x ``cells`` grid, horizontal then vertical, unit length
    (zeros for a plane without edges)."""
    import torch
    import torch.nn.functional as F

    g = grey.float()
    if g.shape[0] < 2 or g.shape[1] < 2:
        return torch.zeros(2 * cells * cells)
    gx = (g[:, 1:] - g[:, :-1]).abs()[None, None]
    gy = (g[1:, :] - g[:-1, :]).abs()[None, None]
    f = torch.cat([F.adaptive_avg_pool2d(gx, cells).flatten(), F.adaptive_avg_pool2d(gy, cells).flatten()])
    norm = f.norm()
    return f / norm if norm > 0 else torch.zeros_like(f)


def batch_layouts(batch: dict[str, Any], has_image: Sequence[bool], *, patch: int, temporal: int,
                  merge: int) -> torch.Tensor:
    """``[B, LAYOUT_DIM]`` for a processed batch: each row's screenshot in order; zeros for a row without one."""
    import torch

    rows = len(has_image)
    out = torch.zeros(rows, LAYOUT_DIM)
    pv, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
    with_image = [i for i, yes in enumerate(has_image) if yes]
    if pv is None or grid is None or not with_image:
        return out
    planes = screen_planes(pv, grid, patch=patch, temporal=temporal, merge=merge)
    if len(planes) != len(with_image):
        raise ModelLoadError(located(None, "image_grid_thw", f"{len(planes)} images for {len(with_image)} rows "
                                     "with image tokens", fix="give each (screenshot, instruction) row one image"))
    for row, plane in zip(with_image, planes):
        out[row] = edge_layout(plane).cpu()
    return out
