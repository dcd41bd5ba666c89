"""The layout view: the screenshot put back together from the processor's patches, as edge strength on a grid."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlrouter.core.errors import ModelLoadError
from vlrouter.core.layout import CELLS, LAYOUT_DIM, batch_layouts, edge_layout, screen_planes


def _quadrants(w=320, h=256, shades=(0, 80, 160, 240)):
    """Four flat quarters: top-left, top-right, bottom-left, bottom-right."""
    img = Image.new("L", (w, h))
    for (x, y), s in zip(((0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)), shades):
        img.paste(s, (x, y, x + w // 2, y + h // 2))
    return img.convert("RGB")


def _planes(enc, images):
    batch = enc.prepare(images, ["Click it"] * len(images))
    ids = enc.token_ids
    return batch, screen_planes(batch["pixel_values"], batch["image_grid_thw"], patch=ids.patch,
                                temporal=ids.temporal, merge=ids.merge)


def _quarter_means(plane):
    h, w = plane.shape
    m = 8  # keep off the seams, where resizing blends neighbours
    return [float(plane[r0 + m:r0 + h // 2 - m, c0 + m:c0 + w // 2 - m].mean())
            for r0, c0 in ((0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2))]


def test_the_patches_go_back_together_in_raster_order(tiny_encoder):
    batch, (plane,) = _planes(tiny_encoder, [_quadrants()])
    t, h, w = (int(v) for v in batch["image_grid_thw"][0])
    assert plane.shape == (h * tiny_encoder.token_ids.patch, w * tiny_encoder.token_ids.patch)
    means = _quarter_means(plane)
    assert means == sorted(means) and means[0] < means[1] - 0.5 < means[2] - 1.0 < means[3] - 1.5, means
    h2, w2 = plane.shape[0] // 2, plane.shape[1] // 2
    assert float(plane[8:h2 - 8, 8:w2 - 8].std()) < 0.05  # a flat quarter stays flat: no patch out of place


def test_each_screenshot_of_a_batch_gets_its_own_plane_at_its_own_size(tiny_encoder):
    dark, light = Image.new("RGB", (320, 240), (10, 10, 10)), Image.new("RGB", (240, 400), (245, 245, 245))
    batch, planes = _planes(tiny_encoder, [dark, light])
    p = tiny_encoder.token_ids.patch
    for plane, (_, h, w) in zip(planes, batch["image_grid_thw"].tolist()):
        assert plane.shape == (h * p, w * p)
    assert planes[0].shape != planes[1].shape
    assert float(planes[0].mean()) < -1.0 < 1.0 < float(planes[1].mean())  # normalised: dark < 0 < light


def test_edge_strength_lands_in_the_cells_of_the_edge_and_its_direction():
    plane = torch.zeros(64, 128)
    plane[:, 90:] = 1.0  # one vertical edge, 70 % of the way across
    f = edge_layout(plane)
    assert f.shape == (LAYOUT_DIM,) and float(f.norm()) == pytest.approx(1.0)
    across, down = f[:CELLS * CELLS].reshape(CELLS, CELLS), f[CELLS * CELLS:].reshape(CELLS, CELLS)
    assert float(down.abs().sum()) == 0.0  # no change from row to row
    cols = torch.nonzero(across.sum(0)).flatten().tolist()
    assert cols == [11] and torch.allclose(across[:, 11], across[0, 11].expand(CELLS))  # columns 89|90 of 128


def test_a_horizontal_edge_lands_in_its_row_of_cells_and_only_in_the_downward_half():
    plane = torch.zeros(128, 64)
    plane[90:, :] = 1.0  # one horizontal edge, 70 % of the way down
    f = edge_layout(plane)
    across, down = f[:CELLS * CELLS].reshape(CELLS, CELLS), f[CELLS * CELLS:].reshape(CELLS, CELLS)
    assert float(across.abs().sum()) == 0.0
    assert torch.nonzero(down.sum(1)).flatten().tolist() == [11]  # rows 89|90 of 128: one row of cells
    assert torch.allclose(down[11], down[11, 0].expand(CELLS))
    tiny = torch.zeros(2, 2)
    tiny[1, :] = 1.0  # the smallest plane with an edge still shows it
    assert float(edge_layout(tiny)[CELLS * CELLS:].sum()) > 0 and float(edge_layout(tiny.T)[:CELLS * CELLS].sum()) > 0


def test_the_plane_is_the_screenshots_brightness_over_all_channels(tiny_encoder):
    """Red and blue of about the same brightness look alike (the plane averages the normalised channels)."""
    img = Image.new("RGB", (320, 256), (255, 0, 0))
    img.paste((0, 0, 255), (160, 0, 320, 256))
    _, (plane,) = _planes(tiny_encoder, [img])
    w = plane.shape[1]
    left, right = float(plane[:, 8:w // 2 - 8].mean()), float(plane[:, w // 2 + 8:-8].mean())
    assert abs(left - right) < 0.1, (left, right)  # one channel alone would differ by about 3.7


def test_a_screen_without_edges_or_too_small_to_have_any_is_the_zero_vector():
    assert float(edge_layout(torch.full((40, 60), 3.0)).abs().sum()) == 0.0
    assert float(edge_layout(torch.rand(1, 60)).abs().sum()) == 0.0
    assert float(edge_layout(torch.rand(60, 1)).abs().sum()) == 0.0
    assert edge_layout(torch.rand(1, 1)).shape == (LAYOUT_DIM,)


def test_the_layout_ignores_contrast_theme_and_size():
    g = torch.Generator().manual_seed(0)
    plane = torch.zeros(96, 160)
    for _ in range(12):  # boxes, like widgets
        r, c = int(torch.randint(0, 80, (1,), generator=g)), int(torch.randint(0, 140, (1,), generator=g))
        plane[r:r + 12, c:c + 18] = float(torch.rand(1, generator=g))
    base = edge_layout(plane)
    assert torch.allclose(edge_layout(3.0 * plane + 7.0), base, atol=1e-6)  # contrast and brightness
    assert torch.allclose(edge_layout(1.0 - plane), base, atol=1e-6)  # dark theme: the same edges
    bigger = plane.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert float(edge_layout(bigger) @ base) > 0.9  # the same screen at twice the size
    assert float(edge_layout(plane.T.contiguous()[:96, :96]) @ base) < 0.9  # another screen differs


def test_batch_layouts_follow_the_rows_with_a_screenshot_and_leave_the_others_zero(tiny_encoder):
    ids = tiny_encoder.token_ids
    batch, planes = _planes(tiny_encoder, [_quadrants(), Image.new("RGB", (300, 200), "white")])
    out = batch_layouts(batch, [False, True, False, True], patch=ids.patch, temporal=ids.temporal, merge=ids.merge)
    assert out.shape == (4, LAYOUT_DIM)
    assert float(out[0].abs().sum()) == float(out[2].abs().sum()) == 0.0
    assert torch.equal(out[1], edge_layout(planes[0])) and float(out[1].norm()) == pytest.approx(1.0)
    assert float(out[3].abs().sum()) == 0.0  # a white screen has no edges
    none = batch_layouts({"input_ids": batch["input_ids"]}, [True, True], patch=ids.patch, temporal=ids.temporal,
                         merge=ids.merge)
    assert float(none.abs().sum()) == 0.0  # no pixels at all: nothing to see


def test_patches_that_do_not_fit_the_grid_are_a_located_error_with_the_fix(tiny_encoder):
    ids = tiny_encoder.token_ids
    batch, _ = _planes(tiny_encoder, [_quadrants()])
    kw = {"patch": ids.patch, "temporal": ids.temporal, "merge": ids.merge}
    with pytest.raises(ModelLoadError, match=r"pixel_values: patches of shape .* do not match image_grid_thw"
                                             r".*fix: use a Qwen-VL processor saved with the model"):
        screen_planes(batch["pixel_values"], batch["image_grid_thw"], **{**kw, "patch": ids.patch * 2})
    with pytest.raises(ModelLoadError, match="pixel_values"):
        screen_planes(batch["pixel_values"][:-4], batch["image_grid_thw"], **kw)
    odd = batch["image_grid_thw"].clone()
    odd[0, 1], odd[0, 2] = odd[0, 1] * odd[0, 2] // 3, 3  # same patch count, a width the merge does not divide
    with pytest.raises(ModelLoadError, match="merge 2"):
        screen_planes(batch["pixel_values"], odd, **kw)
    with pytest.raises(ModelLoadError, match=r"image_grid_thw: 1 images for 2 rows with image tokens.*fix: give each"):
        batch_layouts(batch, [True, True], **kw)


def test_the_token_ids_read_the_patch_geometry_from_the_model(tiny_encoder):
    vision = tiny_encoder.model.config.vision_config
    ids = tiny_encoder.token_ids
    assert (ids.patch, ids.temporal, ids.merge) == (vision.patch_size, vision.temporal_patch_size,
                                                    vision.spatial_merge_size)
