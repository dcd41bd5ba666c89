"""The frozen Qwen3-VL: loading, input formatting, and the Encoder that embeds samples into views.

One function formats (image, prompt) for the model -- :func:`build_inputs` -- and the
:class:`Encoder` runs it through :func:`vlrouter.core.views.encode_views`: every view at
every requested layer from ONE pass that stops after the deepest requested layer (early
exit). Training features (``router embed``) and the engine's routing pass both format
with :func:`build_inputs` and pool with ``encode_views``, so what the head sees at
inference is what it was trained on.

Pooling never uses token 0: under causal attention the first position attends only
to itself, so ``hidden_states[-1][:, 0, :]`` is identical for every input (the seed's
choice; ``tests/core/test_encoder.py`` shows it). Every view handles left and right padding.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlrouter.core.data import prompt_problem
from vlrouter.core.errors import InputError, ModelLoadError, located
from vlrouter.core.paths import looks_like_local_path
from vlrouter.core.views import TokenIds, encode_views, num_text_layers

FEATURES_FORMAT = 2  # cache entries hold every view at several layers (format 1: one pooled vector)
MAX_PROMPT_TOKENS = 4096  # router.max_prompt_tokens' default: an instruction, not a document
_LIMIT_ATTR = "vlrouter_max_prompt_tokens"

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
    """``None``/``"auto"`` -> ``cuda`` when available, else ``cpu``. Any other value must name a device
    this machine has: :class:`InputError` for ``cuda`` on a CPU-only torch build, ``cuda:3`` with one GPU,
    or a name torch does not know -- before any weights load."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    fix = "leave --device out (auto: cuda when available, else cpu), or pass --device cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(located(None, "--device", f"unknown device {device!r}", fix=fix)) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise InputError(located(None, "--device", f"{device!r}: {why} (torch {torch.__version__})", fix=fix))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(located(None, "--device", f"{device!r}: this machine has {torch.cuda.device_count()} "
                                     "CUDA device(s)", fix=fix))
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InputError(located(None, "--device", f"{device!r}: MPS is not available here", fix=fix))
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise InputError(located(None, "--device", f"{device!r}: not available here", fix=fix))
    return device


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bars from transformers / huggingface_hub while loading (the library never prints;
    the CLI draws its own). Restores their previous setting afterwards."""
    import transformers
    from huggingface_hub import utils as hub_utils

    tf_log = transformers.utils.logging
    tf_was = tf_log.is_progress_bar_enabled()
    hub_was = not hub_utils.are_progress_bars_disabled()
    tf_log.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if tf_was:
            tf_log.enable_progress_bar()
        if hub_was:
            hub_utils.enable_progress_bars()


def check_local_model(base_model: str) -> None:
    """A ``base_model`` that can only be a path must be a folder here: never hand it to the Hub (which
    retries for minutes offline). Hub ids (``org/name``) pass."""
    if looks_like_local_path(base_model) and not Path(base_model).expanduser().is_dir():
        state = "is not a folder" if Path(base_model).expanduser().exists() else "not found"
        raise ModelLoadError(located(base_model, None, f"local base model folder {state}",
                                     fix="build it (`router tiny-model DIR`) or download the model there, or "
                                         "correct base_model in registry.yaml"))


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

    check_local_model(base_model)
    try:
        with quiet_loading():
            proc = AutoProcessor.from_pretrained(base_model, revision=revision)
        proc.tokenizer.padding_side = "left"
        return proc
    except Exception as e:  # no torchvision -> the video processor cannot be built; or not found
        first_error = e
    try:
        with quiet_loading():
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
    check_local_model(base_model)
    try:
        with quiet_loading():
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


def set_prompt_token_limit(processor, max_tokens: int) -> None:
    """Set ``router.max_prompt_tokens`` for every :func:`build_inputs` call with this processor."""
    setattr(processor, _LIMIT_ATTR, int(max_tokens))


def prompt_token_limit(processor) -> int:
    return int(getattr(processor, _LIMIT_ATTR, MAX_PROMPT_TOKENS))


def _special_tokens(tokenizer) -> frozenset[str]:
    """The tokenizer's special tokens (``<|image_pad|>``, ``<|im_start|>``, …), computed once per tokenizer."""
    cached = getattr(tokenizer, "_vlrouter_special", None)
    if cached is None:
        found = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(tok, "special", False):
                found.add(str(tok.content))
        cached = frozenset(t for t in found if t)
        try:
            tokenizer._vlrouter_special = cached
        except Exception:
            pass
    return cached


def check_prompts(processor, prompts: Sequence[str]) -> None:
    """Refuse, before the processor sees them, prompts the model cannot take as an instruction.

    Empty; not valid Unicode (a lone surrogate); holding a special token of the chat
    format (``<|image_pad|>`` would make the processor expect another image); or longer
    than ``router.max_prompt_tokens`` tokens. The same check runs for training features
    and for the engine (both go through :func:`build_inputs`), so what trains is what routes.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    limit = prompt_token_limit(processor)
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise InputError(located(None, f"item {i}", "prompt is empty", fix="pass the instruction text"))
        where = f"item {i}" if len(prompts) > 1 else None
        problem = prompt_problem(p)
        if problem is None:
            hit = next((t for t in _special_tokens(tokenizer) if t in p), None)
            if hit is not None:
                problem = f"holds the special token {hit!r}, which the model's chat format reserves"
        if problem is not None:
            raise InputError(located(None, where, f"prompt {problem}", fix="remove it from the instruction"))
        if len(p.encode("utf-8")) > limit:  # a byte-level BPE token is at least one byte: count only when needed
            n = len(tokenizer(p, add_special_tokens=False)["input_ids"])
            if n > limit:
                raise InputError(located(None, where, f"prompt is {n:,} tokens, over router.max_prompt_tokens="
                                         f"{limit:,}", fix="shorten the instruction, or raise "
                                                           "router.max_prompt_tokens in registry.yaml"))


def build_inputs(processor, images: Sequence, prompts: Sequence[str], *, add_generation_prompt: bool = True):
    """Format and process a batch: chat template + image processor + tokenizer, left padded.

    Returns a ``BatchFeature`` with ``input_ids``, ``attention_mask``, ``pixel_values``,
    ``image_grid_thw`` and ``mm_token_type_ids`` -- pass them all to the model.
    Prompts are checked first (:func:`check_prompts`).
    """
    if len(images) != len(prompts):
        raise InputError(located(None, "images", f"got {len(images)} images for {len(prompts)} prompts",
                                 fix="pass one image per prompt"))
    check_prompts(processor, prompts)
    texts = [
        processor.apply_chat_template(build_messages(img, p), tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
        for img, p in zip(images, prompts)
    ]
    return processor(text=texts, images=list(images), return_tensors="pt", padding=True, padding_side="left")


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
