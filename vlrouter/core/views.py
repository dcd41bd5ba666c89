"""Views of the frozen model's hidden states from ONE forward pass, with an early exit after the deepest layer asked.

A *view* pools one layer's hidden states a certain way: ``mean`` of the non-pad tokens,
``image-mean`` / ``image-grid`` / ``image-std`` of the screenshot's tokens, ``text-mean``
of the instruction's tokens, ``last`` non-pad token. :func:`encode_views` computes every
asked view at every asked layer in one pass that stops right after the deepest of them;
training features and the engine's routing pass both go through it, so what the head
sees at inference is what it was trained on. A :class:`Representation` (views + layer)
says which of them a head reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlrouter.core.errors import InputError, ModelLoadError, located
from vlrouter.core.layout import LAYOUT_DIM, batch_layouts

# ---- views of the hidden states, from one forward pass --------------------------------------

VIEWS = ("mean", "image-mean", "text-mean", "last", "image-grid", "image-std")
"""``mean``: every non-pad token; ``image-mean``: the screenshot's tokens; ``text-mean``: the
instruction's tokens; ``last``: the last non-pad token; ``image-grid``: the screenshot's tokens
averaged over each quarter of the screen (top-left, top-right, bottom-left, bottom-right;
4 × H: where things are laid out); ``image-std``: their per-dimension spread (how busy the
screen is). Never token 0 (constant under causal attention)."""
VIEW_WIDTH = {"image-grid": 4}  # views wider than the hidden size, in multiples of it
LAYOUT = "layout"
"""Not a hidden-state view: the screenshot's edge layout (:mod:`vlrouter.core.layout`), the same at every
layer, stored beside the views for the OOD score; never a head's input."""
CACHED_VIEWS = (*VIEWS, LAYOUT)  # what one feature-cache entry holds per layer


def view_width(view: str, hidden_size: int) -> int:
    """How many numbers one view of one sample has."""
    return LAYOUT_DIM if view == LAYOUT else VIEW_WIDTH.get(view, 1) * hidden_size


def view_key(view: str, layer: int) -> str:
    """The name of one pooled view at one hidden layer, e.g. ``image-mean@2`` (cache entries, router.json)."""
    return f"{view}@{layer}"


def default_layers(num_layers: int) -> list[int]:
    """Candidate layers for ``router.layer: auto``: a quarter, half, three quarters of the depth, and the last.

    Hidden-state index ``i`` is the output of decoder layer ``i`` (1-based); ``num_layers``
    is the last one (after the final norm), ``0`` the input embeddings.
    """
    return sorted({max(1, round(num_layers * k / 4)) for k in (1, 2, 3, 4)})


def resolve_layer(layer: int, num_layers: int, *, where: str | None = "router.layer") -> int:
    """``layer`` as a hidden-state index 0..num_layers (negative counts from the end: -1 = the last)."""
    resolved = num_layers + 1 + layer if layer < 0 else layer
    if not 0 <= resolved <= num_layers:
        raise InputError(located(None, where, f"{layer} is out of range for a model with {num_layers} layers",
                                 fix=f"use 1..{num_layers} (or -1..-{num_layers + 1}; -1 is the last), or auto"))
    return resolved


@dataclass(frozen=True)
class Representation:
    """What a router head reads: some views at one layer, concatenated in this order."""

    views: tuple[str, ...]
    layer: int

    def __post_init__(self) -> None:
        if not self.views:
            raise InputError(located(None, "router.pooling", "the view list is empty",
                                     fix=f"name at least one of {', '.join(VIEWS)}, or use auto"))
        bad = [v for v in self.views if v not in VIEWS]
        if bad:
            raise InputError(located(None, "router.pooling", f"unknown view {bad[0]!r}",
                                     fix=f"use {', '.join(VIEWS)} (one, or a list), or auto; never token 0"))

    @property
    def keys(self) -> list[str]:
        return [view_key(v, self.layer) for v in self.views]

    @property
    def label(self) -> str:
        return f"{'+'.join(self.views)} @ layer {self.layer}"

    def width(self, hidden_size: int) -> int:
        """Features the head reads: the views' widths (``image-grid`` is 4 × H) added up."""
        return sum(view_width(v, hidden_size) for v in self.views)

    def features(self, views: dict[str, Any]):
        """The head's input ``[N, len(views) * H]`` from a dict of pooled views (:func:`encode_views`)."""
        import torch

        missing = [k for k in self.keys if k not in views]
        if missing:
            raise InputError(located(None, "features", f"views {missing} were not embedded",
                                     fix="embed again (`router embed`) with this layer in the candidate set"))
        return torch.cat([views[k] for k in self.keys], dim=-1)


@dataclass(frozen=True)
class TokenIds:
    """The special tokens that delimit the screenshot and the instruction in a chat-formatted user turn,
    how many patches per side the vision tower merges into one token, and the patches' size in pixels and
    frames (how ``pixel_values`` is laid out)."""

    image: int
    vision_end: int
    turn_end: int
    merge: int = 2
    patch: int = 16
    temporal: int = 2

    @classmethod
    def of(cls, model, processor) -> TokenIds:
        cfg = getattr(model, "config", None)
        tok = processor.tokenizer
        image = getattr(cfg, "image_token_id", None)
        vend = getattr(cfg, "vision_end_token_id", None)
        vision = getattr(cfg, "vision_config", None)
        ip = getattr(processor, "image_processor", None)

        def size(cfg_name: str, proc_name: str, default: int) -> int:
            return int(getattr(vision, cfg_name, None) or getattr(ip, proc_name, None) or default)

        return cls(image=int(image if image is not None else tok.convert_tokens_to_ids("<|image_pad|>")),
                   vision_end=int(vend if vend is not None else tok.convert_tokens_to_ids("<|vision_end|>")),
                   turn_end=int(tok.convert_tokens_to_ids("<|im_end|>")),
                   merge=size("spatial_merge_size", "merge_size", 2), patch=size("patch_size", "patch_size", 16),
                   temporal=size("temporal_patch_size", "temporal_patch_size", 2))


def _quarter_masks(image, image_grid_thw, merge: int) -> list[Any]:
    """Four ``[B, T]`` masks splitting each row's image tokens into screen quarters (TL, TR, BL, BR).

    Image tokens come in raster order over ``(h / merge) x (w / merge)`` merged patches
    (``image_grid_thw`` gives ``t, h, w`` per image, one image per row); a middle row or
    column of an odd-sized grid counts in both halves. Without a usable grid the tokens
    split into quarters by order.
    """
    import torch

    index = image.long().cumsum(1) - 1  # position of each image token within its image
    counts = image.sum(1)
    cols = torch.zeros_like(counts)
    if image_grid_thw is not None and len(image_grid_thw) == image.shape[0]:
        g = torch.as_tensor(image_grid_thw, device=image.device)
        cols = torch.div(g[:, 2], merge, rounding_mode="floor")
        cols = torch.where(cols * torch.div(g[:, 1], merge, rounding_mode="floor") * g[:, 0] == counts, cols, 0)
    by_order = cols == 0  # fall back: a 2x2 "grid" of the token order
    cols = torch.where(by_order, 2, cols).unsqueeze(1)
    rows = torch.where(by_order, 2, torch.div(counts, cols.squeeze(1), rounding_mode="floor")).unsqueeze(1)
    idx = torch.where(by_order.unsqueeze(1), torch.div(index * 4, counts.clamp_min(1).unsqueeze(1),
                                                       rounding_mode="floor"), index)
    r = torch.div(idx, cols, rounding_mode="floor")
    c = idx - r * cols
    top, bottom = r * 2 < rows, r * 2 >= rows - 1
    left, right = c * 2 < cols, c * 2 >= cols - 1
    return [(image & a & b).float() for a, b in ((top, left), (top, right), (bottom, left), (bottom, right))]


def view_masks(input_ids, attention_mask, ids: TokenIds, image_grid_thw=None) -> dict[str, Any]:
    """``[B, T]`` float masks of the tokens each mean-view averages (left or right padding).

    ``text-mean`` covers the instruction: the tokens after the screenshot's
    ``<|vision_end|>`` up to the end of the user turn (``<|im_end|>``); a row without an
    image falls back to every non-pad, non-image token. ``image-grid`` is a list of four
    masks, one per screen quarter (:func:`_quarter_masks`).
    """
    import torch

    mask = attention_mask.bool()
    image = (input_ids == ids.image) & mask
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    big = input_ids.shape[1]
    vend = torch.where((input_ids == ids.vision_end) & mask, pos, torch.full_like(pos, -1)).amax(1, keepdim=True)
    after = pos > vend
    ends = torch.where((input_ids == ids.turn_end) & after & mask, pos, torch.full_like(pos, big)).amin(1, keepdim=True)
    text = after & (pos < ends) & mask & (vend >= 0)
    no_image = (vend < 0).expand_as(mask)
    text = torch.where(no_image, mask & ~image, text)
    return {"mean": mask.float(), "image-mean": image.float(), "text-mean": text.float(),
            "image-grid": _quarter_masks(image, image_grid_thw, ids.merge)}


def pool_views(hidden, masks: dict[str, Any], attention_mask, views: Sequence[str]) -> dict[str, Any]:
    """Pool ``hidden [B, T, H]`` into each requested view; fp32 ``[B, H]`` each."""
    import torch

    h = hidden.float()

    def mean(mask):
        w = mask.to(h.device).unsqueeze(-1)
        return (h * w).sum(1) / w.sum(1).clamp_min(1.0)

    out = {}
    for v in views:
        if v == "last":
            m = attention_mask.to(h.device).long()
            positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
            idx = (positions * m).argmax(1)
            out[v] = h[torch.arange(h.shape[0], device=h.device), idx]
        elif v == "image-grid":
            out[v] = torch.cat([mean(q) for q in masks[v]], dim=-1)
        elif v == "image-std":
            w = masks["image-mean"].to(h.device).unsqueeze(-1)
            mu = mean(masks["image-mean"]).unsqueeze(1)
            out[v] = (((h - mu) ** 2 * w).sum(1) / w.sum(1).clamp_min(1.0)).sqrt()
        else:
            out[v] = mean(masks[v])
    return out


def pool_hidden(hidden, attention_mask, pooling: str):
    """One view of ``hidden [B, T, H]`` pooled over the non-pad tokens (``mean`` or ``last``); fp32 ``[B, H]``."""
    if pooling not in ("mean", "last"):
        raise InputError(located(None, "pooling", f"pool_hidden pools mean or last, not {pooling!r}",
                                 fix="use encode_views for the image-mean and text-mean views"))
    mask = attention_mask.to(hidden.device)
    return pool_views(hidden, {"mean": mask.float()}, mask, [pooling])[pooling]


def inner_vl_model(model):
    """The ``Qwen3VLModel`` inside a ForConditionalGeneration or a PeftModel wrapping one."""
    m = model
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    inner = getattr(m, "model", None)
    if inner is None or not hasattr(inner, "language_model"):
        raise ModelLoadError(located(None, "base_model", f"{type(model).__name__} is not a Qwen3-VL model",
                                     fix="load a Qwen3-VL checkpoint"))
    return inner


class _StopForward(Exception):
    """Raised by a hook once the deepest requested layer has run: the routing pass's early exit."""


def num_text_layers(model) -> int:
    return int(inner_vl_model(model).language_model.config.num_hidden_layers)


def encode_views(model, batch, layers: Sequence[int], views: Sequence[str] = CACHED_VIEWS, *, token_ids: TokenIds,
                 early_exit: bool = True) -> dict[str, Any]:
    """Run the VL model once (no LM head) and pool ``views`` at each of ``layers``: ``{"view@layer": [B, H]}``
    (``layout``: ``[B, LAYOUT_DIM]`` from the batch's pixels, under every layer's name).

    Layers are hidden-state indices (:func:`resolve_layer`): ``i`` is the output of decoder
    layer ``i``, the last one is taken after the final norm (what ``output_hidden_states``
    reports), ``0`` is the input embeddings. When every requested layer is below the last,
    the pass stops right after the deepest one (``early_exit``): later layers cost
    nothing. fp32 on CPU. With a PeftModel call it under ``lora.adapters_off(model)`` (or peft's ``disable_adapter()``).
    """
    import torch

    inner = inner_vl_model(model)
    blocks = inner.language_model.layers
    n = len(blocks)
    wanted = sorted({resolve_layer(layer, n) for layer in layers})
    device = next(inner.parameters()).device
    kwargs = {k: v.to(device) for k, v in batch.items()}
    mask = kwargs["attention_mask"]
    masks = view_masks(kwargs["input_ids"], mask, token_ids, kwargs.get("image_grid_thw"))
    captured: dict[int, Any] = {}
    stop_after = wanted[-1] if early_exit and wanted[-1] < n else None
    hooks = []

    def grab(index: int):
        def hook(module, args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
            if index == stop_after:
                raise _StopForward
        return hook

    def grab_input(module, args, kw):
        captured[0] = args[0] if args else kw["hidden_states"]
        if stop_after == 0:
            raise _StopForward

    try:
        for i in wanted:
            if i == 0:
                hooks.append(blocks[0].register_forward_pre_hook(grab_input, with_kwargs=True))
            elif i < n:
                hooks.append(blocks[i - 1].register_forward_hook(grab(i)))
        out = None
        with torch.inference_mode():
            try:
                out = inner(**kwargs, use_cache=False, return_dict=True)
            except _StopForward:
                pass
        if n in wanted:
            captured[n] = out.last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    layout = None
    if LAYOUT in views:  # from the pixels, not the hidden states: the same at every layer
        layout = batch_layouts(kwargs, (masks["image-mean"].sum(1) > 0).tolist(), patch=token_ids.patch,
                               temporal=token_ids.temporal, merge=token_ids.merge)
    result = {}
    for i in wanted:
        for v, t in pool_views(captured[i], masks, mask, [v for v in views if v != LAYOUT]).items():
            result[view_key(v, i)] = t.cpu()
        if layout is not None:
            result[view_key(LAYOUT, i)] = layout.clone()  # one tensor per name (safetensors refuses shared)
    return result


def encode_pooled(model, batch, *, layer: int = -1, pooling: str = "mean", token_ids: TokenIds):
    """One view at one layer, fp32 ``[B, H]`` on CPU (early exit below the last layer)."""
    key = view_key(pooling, resolve_layer(layer, num_text_layers(model)))
    return encode_views(model, batch, [layer], [pooling], token_ids=token_ids)[key]
