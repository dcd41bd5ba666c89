"""The frozen Qwen3-VL: loading, input formatting, and views of its hidden states from one forward pass.

One function formats (image, prompt) for the model -- :func:`build_inputs` -- and one
runs it and pools -- :func:`encode_views`: every *view* (``mean`` of the non-pad tokens,
``image-mean`` of the screenshot's tokens, ``text-mean`` of the instruction's tokens,
``last`` non-pad token) at every requested layer, from ONE pass that stops after the
deepest requested layer (early exit). Training features (``router embed``) and the
engine's routing pass both go through it, so what the head sees at inference is what it
was trained on. A :class:`Representation` (views + layer) says which of them a head reads.

Pooling never uses token 0: under causal attention the first position attends only
to itself, so ``hidden_states[-1][:, 0, :]`` is identical for every input (the seed's
choice; ``tests/core/test_encoder.py`` shows it). Every view handles left and right padding.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlrouter.core.errors import InputError, ModelLoadError, located

FEATURES_FORMAT = 2  # cache entries hold every view at several layers (format 1: one pooled vector)

@functools.cache
def image_only_processor_class() -> type:
    """``ImageOnlyQwen3VLProcessor``: Qwen3VLProcessor without the video processor (which needs torchvision).

    Same tokenizer, image processor and chat template as the real one, and the real
    ``__call__`` (image-token expansion, ``mm_token_type_ids``), so outputs for
    images are identical. Screenshots need no video. Built on first use, so importing
    this module does not import transformers.
    """
    from transformers import Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        __doc__ = image_only_processor_class.__doc__

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
            self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
            self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
            self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)

    return ImageOnlyQwen3VLProcessor


def resolve_device(device: str | None = None) -> str:
    """``None``/``"auto"`` -> ``cuda`` when available, else ``cpu``."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | None, device: str):
    """``None``/``"auto"``: bf16 on GPU, fp32 on CPU. Else ``float32``/``bfloat16``/``float16``."""
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise InputError(located(None, "router.dtype", f"unknown dtype {dtype!r}",
                                 fix="one of float32, bfloat16, float16, auto"))
    return table[dtype]


def _read_chat_template(path: Path) -> str | None:
    for name in ("chat_template.jinja", "chat_template.json"):
        p = path / name
        if p.exists():
            text = p.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def load_processor(base_model: str, *, revision: str | None = None):
    """The real Qwen3VLProcessor when it can be built, else :class:`ImageOnlyQwen3VLProcessor`.

    Works the same for a hub id (``Qwen/Qwen3-VL-8B-Instruct``) and a local folder.
    The tokenizer pads on the left (generation and pooling both expect it).
    """
    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLImageProcessorPil

    try:
        proc = AutoProcessor.from_pretrained(base_model, revision=revision)
        proc.tokenizer.padding_side = "left"
        return proc
    except Exception as e:  # no torchvision -> the video processor cannot be built; or not found
        first_error = e
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model, revision=revision)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(base_model, revision=revision)
    except Exception as e:
        raise ModelLoadError(
            located(base_model, None, f"cannot load the processor: {first_error}; image-only fallback: {e}",
                    fix="pass a local Qwen3-VL folder, or a hub id with network access")
        ) from None
    tokenizer.padding_side = "left"
    template = getattr(tokenizer, "chat_template", None)
    if Path(base_model).is_dir():
        template = _read_chat_template(Path(base_model)) or template
    if not template:
        raise ModelLoadError(
            located(base_model, None, "no chat template found", fix="add chat_template.jinja to the model folder")
        )
    return image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=template)


def load_base_model(base_model: str, *, device: str | None = None, dtype: str | None = None,
                    revision: str | None = None):
    """Load Qwen3-VL for conditional generation, frozen, in eval mode."""
    from transformers import AutoModelForImageTextToText

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        model = AutoModelForImageTextToText.from_pretrained(base_model, dtype=torch_dtype, revision=revision)
    except OSError as e:
        raise ModelLoadError(
            located(base_model, None, f"cannot load the base model: {e}",
                    fix="pass a local Qwen3-VL folder (e.g. from `router tiny-model`), or a hub id with network access")
        ) from None
    except ValueError as e:
        raise ModelLoadError(located(base_model, None, f"not a Qwen3-VL checkpoint: {e}",
                                     fix="use a Qwen3-VL model")) from None
    model.to(dev).eval()
    model.requires_grad_(False)
    return model


def model_fingerprint(base_model: str, revision: str | None = None) -> str:
    """Identifies the base weights: hub id + revision, or a local folder's config + weights index."""
    p = Path(base_model)
    h = hashlib.sha256()
    if p.is_dir():
        for name in ("config.json", "model.safetensors.index.json"):
            if (p / name).exists():
                h.update((p / name).read_bytes())
        for w in sorted(p.glob("*.safetensors")):
            st = w.stat()
            h.update(f"{w.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(f"{base_model}@{revision or 'main'}".encode())
    return h.hexdigest()[:16]


def processor_fingerprint(processor) -> str:
    """Settings that change what the model sees: image processor config + chat template."""
    ip = processor.image_processor.to_dict()
    keep = {k: ip.get(k) for k in ("size", "min_pixels", "max_pixels", "patch_size", "merge_size",
                                   "temporal_patch_size", "image_mean", "image_std", "do_resize", "resample")}
    blob = json.dumps(keep, sort_keys=True, default=str) + "\n" + (processor.chat_template or "")
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_messages(image, prompt: str) -> list[dict[str, Any]]:
    """The user turn as a chat-template content list: image first, then the instruction.

    The seed's LLaVA ``<image>\\n`` prefix is stripped by the dataset reader; the image
    always goes first, as in the seed's conversations.
    """
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]


def build_inputs(processor, images: Sequence, prompts: Sequence[str], *, add_generation_prompt: bool = True):
    """Format and process a batch: chat template + image processor + tokenizer, left padded.

    Returns a ``BatchFeature`` with ``input_ids``, ``attention_mask``, ``pixel_values``,
    ``image_grid_thw`` and ``mm_token_type_ids`` -- pass them all to the model.
    """
    if len(images) != len(prompts):
        raise InputError(located(None, "images", f"got {len(images)} images for {len(prompts)} prompts",
                                 fix="pass one image per prompt"))
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise InputError(located(None, f"item {i}", "prompt is empty", fix="pass the instruction text"))
    texts = [
        processor.apply_chat_template(build_messages(img, p), tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
        for img, p in zip(images, prompts)
    ]
    return processor(text=texts, images=list(images), return_tensors="pt", padding=True, padding_side="left")


# ---- views of the hidden states, from one forward pass --------------------------------------

VIEWS = ("mean", "image-mean", "text-mean", "last", "image-grid", "image-std")
"""``mean``: every non-pad token; ``image-mean``: the screenshot's tokens; ``text-mean``: the
instruction's tokens; ``last``: the last non-pad token; ``image-grid``: the screenshot's tokens
averaged over each quarter of the screen (top-left, top-right, bottom-left, bottom-right;
4 × H: where things are laid out); ``image-std``: their per-dimension spread (how busy the
screen is). Never token 0 (constant under causal attention)."""
VIEW_WIDTH = {"image-grid": 4}  # views wider than the hidden size, in multiples of it


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
        return sum(VIEW_WIDTH.get(v, 1) for v in self.views) * hidden_size

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
    and how many patches per side the vision tower merges into one token."""

    image: int
    vision_end: int
    turn_end: int
    merge: int = 2

    @classmethod
    def of(cls, model, processor) -> TokenIds:
        cfg = getattr(model, "config", None)
        tok = processor.tokenizer
        image = getattr(cfg, "image_token_id", None)
        vend = getattr(cfg, "vision_end_token_id", None)
        merge = getattr(getattr(cfg, "vision_config", None), "spatial_merge_size", None)
        return cls(image=int(image if image is not None else tok.convert_tokens_to_ids("<|image_pad|>")),
                   vision_end=int(vend if vend is not None else tok.convert_tokens_to_ids("<|vision_end|>")),
                   turn_end=int(tok.convert_tokens_to_ids("<|im_end|>")),
                   merge=int(merge or getattr(processor.image_processor, "merge_size", 2)))


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


def encode_views(model, batch, layers: Sequence[int], views: Sequence[str] = VIEWS, *, token_ids: TokenIds,
                 early_exit: bool = True) -> dict[str, Any]:
    """Run the VL model once (no LM head) and pool ``views`` at each of ``layers``: ``{"view@layer": [B, H]}``.

    Layers are hidden-state indices (:func:`resolve_layer`): ``i`` is the output of decoder
    layer ``i``, the last one is taken after the final norm (what ``output_hidden_states``
    reports), ``0`` is the input embeddings. When every requested layer is below the last,
    the pass stops right after the deepest one (``early_exit``): later layers cost
    nothing. fp32 on CPU. With a PeftModel call it under ``model.disable_adapter()``.
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
    result = {}
    for i in wanted:
        for v, t in pool_views(captured[i], masks, mask, views).items():
            result[view_key(v, i)] = t.cpu()
    return result


def encode_pooled(model, batch, *, layer: int = -1, pooling: str = "mean", token_ids: TokenIds):
    """One view at one layer, fp32 ``[B, H]`` on CPU (early exit below the last layer)."""
    key = view_key(pooling, resolve_layer(layer, num_text_layers(model)))
    return encode_views(model, batch, [layer], [pooling], token_ids=token_ids)[key]


@dataclass(frozen=True)
class EncoderInfo:
    """What a router records about the encoder its features came from (no model needed)."""

    base_model: str
    hidden_size: int
    num_layers: int
    fingerprint: str


@dataclass
class Encoder:
    """The frozen base model + processor: embeds samples into every view at the layers asked for."""

    model: Any
    processor: Any
    base_model: str
    revision: str | None = None

    def __post_init__(self) -> None:
        self.token_ids = TokenIds.of(self.model, self.processor)

    @classmethod
    def load(cls, base_model: str, *, device: str | None = None, dtype: str | None = None,
             revision: str | None = None) -> Encoder:
        processor = load_processor(base_model, revision=revision)
        model = load_base_model(base_model, device=device, dtype=dtype, revision=revision)
        return cls(model=model, processor=processor, base_model=base_model, revision=revision)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def num_layers(self) -> int:
        return num_text_layers(self.model)

    @property
    def dtype_name(self) -> str:
        return str(next(self.model.parameters()).dtype).replace("torch.", "")

    def fingerprint(self) -> str:
        """Everything that changes a pooled view except the sample itself (base weights, processor, dtype)."""
        blob = json.dumps(
            {
                "model": model_fingerprint(self.base_model, self.revision),
                "processor": processor_fingerprint(self.processor),
                "dtype": self.dtype_name,
                "features": FEATURES_FORMAT,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def info(self) -> EncoderInfo:
        return EncoderInfo(base_model=self.base_model, hidden_size=self.hidden_size, num_layers=self.num_layers,
                           fingerprint=self.fingerprint())

    def prepare(self, images: Sequence, prompts: Sequence[str]):
        """CPU-only stage: chat template + processor (safe to run in worker processes)."""
        return build_inputs(self.processor, images, prompts)

    def embed_prepared(self, batch, layers: Sequence[int], *, early_exit: bool = True) -> dict[str, Any]:
        """GPU stage: one forward, every view at ``layers`` (:func:`encode_views`)."""
        return encode_views(self.model, batch, layers, token_ids=self.token_ids, early_exit=early_exit)

    def embed(self, images: Sequence, prompts: Sequence[str], layers: Sequence[int]) -> dict[str, Any]:
        return self.embed_prepared(self.prepare(images, prompts), layers)
