"""The frozen encoder: from_pretrained round-trip, views of one forward pass, early exit, padding invariance."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from vlrouter.core.encoder import build_inputs
from vlrouter.core.errors import InputError
from vlrouter.core.layout import LAYOUT_DIM, batch_layouts
from vlrouter.core.views import (
    CACHED_VIEWS,
    LAYOUT,
    VIEWS,
    Representation,
    default_layers,
    encode_views,
    inner_vl_model,
    pool_hidden,
    pool_views,
    resolve_layer,
    view_key,
    view_masks,
)


def _images():
    return [Image.new("RGB", (320, 240), c) for c in [(255, 0, 0), (0, 160, 0), (20, 20, 200)]]


PROMPTS = ["Click March 29 in the calendar", "Select Dr. Smith from the provider list", "Submit"]


def test_tiny_model_round_trips_through_from_pretrained(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from vlrouter.core.encoder import Encoder

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


def test_every_view_at_every_layer_equals_pooling_what_output_hidden_states_reports(tiny_encoder):
    enc = tiny_encoder
    batch = enc.prepare(_images(), PROMPTS)
    with torch.inference_mode():
        hs = inner_vl_model(enc.model)(**batch, output_hidden_states=True, use_cache=False).hidden_states
    layers = list(range(enc.num_layers + 1))
    views = encode_views(enc.model, batch, layers, token_ids=enc.token_ids)
    assert set(views) == {view_key(v, i) for v in CACHED_VIEWS for i in layers}
    # the layout view comes from the pixels: the same at every layer, one per screenshot, unit length
    pixels = batch_layouts(batch, [True] * 3, patch=enc.token_ids.patch, temporal=enc.token_ids.temporal,
                           merge=enc.token_ids.merge)
    for i in layers:
        assert torch.equal(views[view_key(LAYOUT, i)], pixels)
    assert pixels.shape == (3, LAYOUT_DIM)
    masks = view_masks(batch["input_ids"], batch["attention_mask"], enc.token_ids, batch["image_grid_thw"])
    for i in layers:
        ref = pool_views(hs[i], masks, batch["attention_mask"], VIEWS)
        for v in VIEWS:
            assert torch.equal(views[view_key(v, i)], ref[v]), (v, i)  # exactly: the same tensors, pooled
    distinct = {v: views[view_key(v, enc.num_layers)] for v in VIEWS if v != "image-grid"}
    for a in distinct:  # different summaries of the same pass
        for b in distinct:
            if a < b:
                assert not torch.allclose(distinct[a], distinct[b])
    grid = views[view_key("image-grid", 1)]
    assert grid.shape == (3, 4 * enc.hidden_size)  # four screen quarters, side by side


def test_early_exit_gives_the_same_views_and_skips_the_later_layers(tiny_encoder):
    enc = tiny_encoder
    batch = enc.prepare(_images(), PROMPTS)
    full = encode_views(enc.model, batch, [1, enc.num_layers], token_ids=enc.token_ids)
    blocks = inner_vl_model(enc.model).language_model.layers
    ran = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        early = encode_views(enc.model, batch, [1], token_ids=enc.token_ids)
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0], ran  # only the first decoder layer ran
    for v in VIEWS:
        assert torch.equal(early[view_key(v, 1)], full[view_key(v, 1)])


def test_view_masks_cover_the_screenshot_and_exactly_the_instruction(tiny_encoder):
    enc = tiny_encoder
    batch = enc.prepare(_images(), PROMPTS)
    m = view_masks(batch["input_ids"], batch["attention_mask"], enc.token_ids)
    tok = enc.processor.tokenizer
    for row, prompt in enumerate(PROMPTS):
        ids = batch["input_ids"][row]
        assert tok.decode(ids[m["text-mean"][row].bool()]) == prompt
        assert int(m["image-mean"][row].sum()) == int((ids == enc.token_ids.image).sum()) > 0
        assert int(m["mean"][row].sum()) == int(batch["attention_mask"][row].sum())


def test_image_grid_splits_the_image_tokens_into_screen_quarters_in_raster_order():
    from vlrouter.core.views import TokenIds

    ids = TokenIds(image=9, vision_end=8, turn_end=7, merge=2)
    row = [1, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 8, 5, 5, 7]  # 12 image tokens: 3 rows x 4 columns
    input_ids = torch.tensor([row])
    masks = view_masks(input_ids, torch.ones_like(input_ids), ids, torch.tensor([[1, 6, 8]]))
    quarters = [sorted((torch.nonzero(q[0]).flatten() - 1).tolist()) for q in masks["image-grid"]]
    # the middle row (4..7) belongs to both halves; the columns split 2 | 2
    assert quarters == [[0, 1, 4, 5], [2, 3, 6, 7], [4, 5, 8, 9], [6, 7, 10, 11]]
    assert masks["text-mean"][0].tolist() == [0] * 14 + [1, 1, 0]
    # 2 rows x 3 columns: the middle column belongs to both halves
    odd = torch.tensor([[1] + [9] * 6 + [8, 5, 7]])
    masks = view_masks(odd, torch.ones_like(odd), ids, torch.tensor([[1, 4, 6]]))
    quarters = [(torch.nonzero(q[0]).flatten() - 1).tolist() for q in masks["image-grid"]]
    assert quarters == [[0, 1], [1, 2], [3, 4], [4, 5]]


@pytest.mark.parametrize("grid", [None, torch.tensor([[1, 6, 6]])], ids=["no-grid", "grid-of-another-image"])
def test_without_a_usable_grid_image_grid_splits_the_image_tokens_into_quarters_by_order(grid):
    from vlrouter.core.views import TokenIds

    ids = TokenIds(image=9, vision_end=8, turn_end=7, merge=2)
    input_ids = torch.tensor([[1] + [9] * 8 + [8, 5, 7]])  # 8 image tokens; a 3x3 grid would need 9
    masks = view_masks(input_ids, torch.ones_like(input_ids), ids, grid)
    quarters = [(torch.nonzero(q[0]).flatten() - 1).tolist() for q in masks["image-grid"]]
    assert quarters == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_token_ids_come_from_the_model_config_and_else_from_the_tokenizer(tiny_encoder):
    from types import SimpleNamespace

    from vlrouter.core.views import TokenIds

    tok = tiny_encoder.processor.tokenizer
    proc = SimpleNamespace(tokenizer=tok, image_processor=SimpleNamespace(merge_size=4))
    vision = SimpleNamespace(spatial_merge_size=3)
    cfg = SimpleNamespace(image_token_id=11, vision_end_token_id=12, vision_config=vision)
    assert TokenIds.of(SimpleNamespace(config=cfg), proc) == TokenIds(
        image=11, vision_end=12, turn_end=tok.convert_tokens_to_ids("<|im_end|>"), merge=3)
    bare = TokenIds.of(SimpleNamespace(), proc)  # a config without them: the tokenizer's special tokens
    assert (bare.image, bare.vision_end, bare.merge) == (
        tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|vision_end|>"), 4)
    assert TokenIds.of(tiny_encoder.model, tiny_encoder.processor) == tiny_encoder.token_ids


def test_token_zero_is_identical_for_every_input(tiny_encoder):
    """Why vlrouter never pools token 0 (the seed's choice): causal attention makes it constant."""
    firsts = []
    for img, prompt in zip(_images(), PROMPTS):
        batch = tiny_encoder.prepare([img], [prompt])  # one at a time: no padding in front
        out = inner_vl_model(tiny_encoder.model)(**batch, output_hidden_states=True)
        firsts.append(out.hidden_states[-1][0, 0])
    for f in firsts[1:]:
        torch.testing.assert_close(f, firsts[0], rtol=0, atol=0)


def test_batched_equals_single_with_left_padding_for_every_view(tiny_encoder):
    enc = tiny_encoder
    batch = enc.prepare(_images(), PROMPTS)
    assert (batch["attention_mask"][:, 0] == 0).any(), "prompts of different length must pad on the left"
    batched = enc.embed_prepared(batch, [1, enc.num_layers])
    singles = [enc.embed([i], [p], [1, enc.num_layers]) for i, p in zip(_images(), PROMPTS)]
    for name, t in batched.items():
        torch.testing.assert_close(t, torch.cat([s[name] for s in singles]), rtol=1e-4, atol=1e-5)


def test_pool_hidden_handles_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(pool_hidden(hidden, left, "last")[0], hidden[0, 3])
    torch.testing.assert_close(pool_hidden(hidden, right, "last")[0], hidden[0, 1])
    torch.testing.assert_close(pool_hidden(hidden, left, "mean")[0], hidden[0, 2:].mean(0))
    torch.testing.assert_close(pool_hidden(hidden, right, "mean")[0], hidden[0, :2].mean(0))


def test_image_views_are_the_mean_and_spread_of_the_screenshots_tokens_only():
    hidden = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0)) + 5.0
    image = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]).float()
    attn = torch.ones(2, 6, dtype=torch.long)
    out = pool_views(hidden, {"image-mean": image}, attn, ["image-mean", "image-std"])
    for row in range(2):
        tokens = hidden[row][image[row].bool()]
        torch.testing.assert_close(out["image-mean"][row], tokens.mean(0))
        torch.testing.assert_close(out["image-std"][row], tokens.std(0, unbiased=False))
    one = pool_views(hidden, {"image-mean": torch.eye(6)[[2, 5]]}, attn, ["image-mean"])["image-mean"]
    torch.testing.assert_close(one, hidden[[0, 1], [2, 5]])  # a single token is its own mean


def test_layers_resolve_from_either_end_and_refuse_out_of_range():
    assert default_layers(12) == [3, 6, 9, 12] and default_layers(2) == [1, 2] and default_layers(1) == [1]
    assert resolve_layer(-1, 12) == 12 and resolve_layer(-13, 12) == 0 and resolve_layer(5, 12) == 5
    for bad in (13, 999, -14):
        with pytest.raises(InputError, match=r"router.layer: .* out of range for a model with 12 layers.*fix: use"):
            resolve_layer(bad, 12)


def test_a_representation_concatenates_its_views_in_order_and_refuses_bad_ones():
    views = {"mean@2": torch.ones(3, 4), "last@2": torch.zeros(3, 4)}
    rep = Representation(("last", "mean"), 2)
    assert rep.keys == ["last@2", "mean@2"] and rep.label == "last+mean @ layer 2"
    assert torch.equal(rep.features(views), torch.cat([views["last@2"], views["mean@2"]], dim=-1))
    with pytest.raises(InputError, match="unknown view 'bogus'"):
        Representation(("mean", "bogus"), 2)
    with pytest.raises(InputError, match="the view list is empty"):
        Representation((), 2)
    with pytest.raises(InputError, match=r"views \['mean@1'\] were not embedded"):
        Representation(("mean",), 1).features(views)
    assert len({Representation(("mean",), 2), Representation(("mean",), 2), rep}) == 2  # a value: hashable, by content
    with pytest.raises(dataclasses.FrozenInstanceError):
        rep.layer = 3  # an engine's representation never changes under it


def test_the_instruction_mask_starts_right_after_the_screenshot_even_at_position_zero():
    from vlrouter.core.views import TokenIds

    ids = TokenIds(image=9, vision_end=8, turn_end=7, merge=2)
    input_ids = torch.tensor([[8, 5, 6, 7, 4], [1, 9, 8, 5, 7]])  # row 0: the screenshot's end is the first token
    masks = view_masks(input_ids, torch.ones_like(input_ids), ids)
    assert masks["text-mean"].tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]]


def test_encode_pooled_is_one_view_of_encode_views(tiny_encoder):
    from vlrouter.core.views import encode_pooled

    enc = tiny_encoder
    batch = enc.prepare(_images(), PROMPTS)
    one = encode_pooled(enc.model, batch, layer=-1, pooling="text-mean", token_ids=enc.token_ids)
    every = encode_views(enc.model, batch, [enc.num_layers], token_ids=enc.token_ids)
    assert one.shape == (len(PROMPTS), enc.hidden_size)
    assert torch.equal(one, every[view_key("text-mean", enc.num_layers)])


def test_empty_prompt_is_refused(tiny_encoder):
    with pytest.raises(InputError, match="empty"):
        build_inputs(tiny_encoder.processor, _images()[:1], ["   "])


def test_dtype_name_is_the_weights_dtype_without_the_torch_prefix(tiny_encoder):
    assert tiny_encoder.dtype_name == "float32"  # the tiny encoder runs on the CPU in fp32


def test_the_input_embeddings_alone_run_no_decoder_layer_and_with_layer_one_exactly_one(tiny_encoder):
    enc = tiny_encoder
    batch = enc.prepare(_images()[:1], PROMPTS[:1])
    full = encode_views(enc.model, batch, list(range(enc.num_layers + 1)), token_ids=enc.token_ids)
    blocks = inner_vl_model(enc.model).language_model.layers
    ran = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        for layers, expect_ran in (([0], []), ([0, 1], [0])):
            ran.clear()
            views = encode_views(enc.model, batch, layers, token_ids=enc.token_ids)
            assert ran == expect_ran, (layers, ran)  # stops right after the deepest layer asked for
            assert set(views) == {view_key(v, i) for v in CACHED_VIEWS for i in layers}
            for k in views:
                assert torch.equal(views[k], full[k]), k
    finally:
        for h in hooks:
            h.remove()


def test_token_ids_cannot_be_changed_once_read_from_the_model(tiny_encoder):
    from vlrouter.core.views import TokenIds

    ids = TokenIds.of(tiny_encoder.model, tiny_encoder.processor)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ids.image = 0  # the routing pass's masks must be the ones the features were made with
    assert ids == tiny_encoder.token_ids and hash(ids) == hash(tiny_encoder.token_ids)


@pytest.mark.parametrize("rows,quarters", [
    (4, [[0, 2], [1, 3], [4, 6], [5, 7]]),  # 4 rows x 2 columns: top = rows 0-1, bottom = rows 2-3
    (5, [[0, 2, 4], [1, 3, 5], [4, 6, 8], [5, 7, 9]]),  # 5 rows: the middle row is in both halves
])
def test_a_tall_screenshot_splits_at_half_its_rows_with_qwens_2x2_patch_merge_by_default(rows, quarters):
    from vlrouter.core.views import TokenIds

    ids = TokenIds(image=9, vision_end=8, turn_end=7)  # merge left out: Qwen's 2 x 2
    n = rows * 2
    input_ids = torch.tensor([[1] + [9] * n + [8, 5, 7]])
    grid = torch.tensor([[1, 2 * rows, 4]])  # t, h, w in patches: rows x 2 merged tokens
    masks = view_masks(input_ids, torch.ones_like(input_ids), ids, grid)
    assert [(torch.nonzero(q[0]).flatten() - 1).tolist() for q in masks["image-grid"]] == quarters


def test_encode_pooled_defaults_to_the_mean_of_the_last_layer(tiny_encoder):
    from vlrouter.core.views import encode_pooled

    enc = tiny_encoder
    batch = enc.prepare(_images()[:1], PROMPTS[:1])
    every = encode_views(enc.model, batch, [enc.num_layers], token_ids=enc.token_ids)
    default = encode_pooled(enc.model, batch, token_ids=enc.token_ids)
    assert torch.equal(default, every[view_key("mean", enc.num_layers)])


def test_without_a_merge_size_anywhere_token_ids_assume_qwens_2x2(tiny_encoder):
    from types import SimpleNamespace

    from vlrouter.core.views import TokenIds

    proc = SimpleNamespace(tokenizer=tiny_encoder.processor.tokenizer, image_processor=SimpleNamespace())
    assert TokenIds.of(SimpleNamespace(), proc).merge == 2


def test_a_row_without_a_screenshot_averages_its_non_pad_non_image_tokens_as_text():
    from vlrouter.core.views import TokenIds

    ids = TokenIds(image=9, vision_end=8, turn_end=7)
    input_ids = torch.tensor([[0, 0, 9, 5, 6, 7]])  # left padding, a stray image token, no <|vision_end|>
    attention = torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert view_masks(input_ids, attention, ids)["text-mean"][0].tolist() == [0, 0, 0, 1, 1, 1]


def test_something_that_is_not_a_qwen3_vl_model_is_a_model_load_error():
    from types import SimpleNamespace

    from vlrouter.core.errors import ModelLoadError

    for model in (SimpleNamespace(), SimpleNamespace(model=SimpleNamespace(vision=None))):
        with pytest.raises(ModelLoadError, match="SimpleNamespace is not a Qwen3-VL model"):
            inner_vl_model(model)


def test_without_early_exit_every_decoder_layer_runs(tiny_encoder):
    enc = tiny_encoder
    batch = enc.prepare(_images()[:1], PROMPTS[:1])
    blocks = inner_vl_model(enc.model).language_model.layers
    ran = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        encode_views(enc.model, batch, [1], token_ids=enc.token_ids, early_exit=False)
    finally:
        for h in hooks:
            h.remove()
    assert ran == list(range(len(blocks)))


def test_a_decoder_layer_that_returns_a_tuple_is_read_by_its_hidden_states(tiny_encoder):
    enc = tiny_encoder
    batch = enc.prepare(_images()[:1], PROMPTS[:1])
    plain = encode_views(enc.model, batch, [1], token_ids=enc.token_ids)
    first = inner_vl_model(enc.model).language_model.layers[0]
    # older transformers' decoder layers return (hidden_states, attentions)
    hook = first.register_forward_hook(lambda m, a, o: (o, torch.zeros(1)))
    try:
        as_tuple = encode_views(enc.model, batch, [1], token_ids=enc.token_ids)  # stops right after layer 1
    finally:
        hook.remove()
    assert all(torch.equal(as_tuple[k], plain[k]) for k in plain)
