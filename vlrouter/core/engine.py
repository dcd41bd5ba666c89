"""The engine: route / act / act_batch on ONE shared base model.

One Qwen3-VL is loaded once. Every registry adapter's PEFT LoRA checkpoint is loaded
into ONE ``PeftModel`` under its adapter name (LoRA adds small A/B matrices beside the
frozen base weights; the base weights exist once). Then, per call:

1. **route** -- the same model runs with ``disable_adapter()`` (the exact base output
   from the same weights), through exactly the formatting and pooling that made the
   training features (:func:`vlrouter.core.encoder.build_inputs` +
   :func:`vlrouter.core.encoder.encode_pooled` with router.json's ``layer`` and
   ``pooling``); the head's logits over the temperature give the probabilities.
2. **act** -- the routed adapter is switched on (``set_adapter``) and the model
   generates (greedy by default); the adapter's plugin parses the text
   (``parse_action`` hook) into a :class:`~vlrouter.core.actions.UIAction`; the raw
   text is always kept. Below ``router.min_confidence`` the registry's
   ``router.fallback`` applies: ``base`` (generate with adapters disabled;
   ``Action.adapter == "base"``), a named adapter, or ``error``
   (:class:`~vlrouter.core.errors.LowConfidenceError`).
3. **act_batch** -- routes every item in one forward, then ONE ``generate`` call with
   peft's mixed-adapter batch (``adapter_names=[...]``, ``"__base__"`` for the base).

The image is encoded once per call: when the adapter used for generation has no LoRA
weights inside the vision tower, the vision features (and Qwen3-VL's deepstack
features) computed by the routing pass are handed to the generation pass instead of
running the vision tower again. An adapter with weights in the vision tower sees a
different vision tower than routing did, so there the image is encoded again.

Thread safety: one engine may be shared by threads. The model is one object with
mutable state (the active adapter, the enabled/disabled flag, Qwen3-VL's cached
``rope_deltas``), so every model pass (route, adapter switch, generate) runs under one
re-entrant lock: concurrent calls are serialised and give exactly the results of
sequential calls. Preprocessing (opening images, the processor) runs outside the model
lock, under its own lock. For throughput, batch with :meth:`Engine.act_batch` instead.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlrouter.core.actions import UIAction
from vlrouter.core.encoder import (
    build_inputs,
    encode_pooled,
    inner_vl_model,
    load_base_model,
    load_processor,
)
from vlrouter.core.errors import (
    InputError,
    LowConfidenceError,
    ModelLoadError,
    RegistryError,
    RouterError,
    StaleRouterError,
    UnknownAdapterError,
    located,
)
from vlrouter.core.head import META_FILE, RouterMeta, check_compatible, load_router
from vlrouter.core.images import open_image

if TYPE_CHECKING:
    import pluggy

    from vlrouter.core.registry import Registry

__all__ = ["BASE", "Action", "AdapterSource", "Engine", "ReloadResult", "Route", "load_adapters",
           "vision_adapters"]

BASE = "base"  # Action.adapter when the base model (no adapter) generated the text
PEFT_BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
FALLBACKS = ("base", "error")


# ---- results ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """The router's answer: the top adapter, its probability, every adapter's probability."""

    adapter: str
    confidence: float
    probs: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "confidence": self.confidence, "probs": dict(self.probs)}


@dataclass(frozen=True)
class Action:
    """What the engine did: the adapter that generated, the text, its parsed action, timings.

    ``adapter`` is the adapter that generated ``text`` (``"base"`` for the base model);
    ``routed`` is the router's top choice -- they differ when ``router.fallback``
    applied because ``confidence`` (the router's probability for ``routed``) was below
    ``router.min_confidence``. ``action`` is None when the text does not parse.
    ``timings`` holds ``route_ms`` (opening the image, processor, routing pass, head),
    ``generate_ms``, ``total_ms`` and ``vision_calls`` (vision-tower forwards during the
    call: 1 when the routing pass's image features were reused); for
    :meth:`Engine.act_batch`, the whole batch's numbers, and ``batch_size``.
    """

    adapter: str
    confidence: float
    text: str
    action: UIAction | None
    timings: dict[str, float]
    routed: str = ""
    probs: dict[str, float] = field(default_factory=dict)

    @property
    def fallback(self) -> bool:
        return self.adapter != self.routed

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "routed": self.routed,
            "fallback": self.fallback,
            "confidence": self.confidence,
            "probs": dict(self.probs),
            "text": self.text,
            "action": None if self.action is None else {"name": self.action.name, "args": dict(self.action.args),
                                                        "call": str(self.action)},
            "timings": dict(self.timings),
        }


# ---- loading adapters into one PeftModel -------------------------------------------------

@dataclass(frozen=True)
class AdapterSource:
    """One PEFT checkpoint to load: its name, folder, and where it was declared (for errors)."""

    name: str
    path: Path
    file: str | Path | None = None  # e.g. registry.yaml
    field: str | None = None  # e.g. adapters[1].checkpoint
    line: int | None = None

    def err(self, problem: str, fix: str) -> ModelLoadError:
        return ModelLoadError(located(self.file, self.field, problem, fix=fix, line=self.line))


def _model_basename(name: str) -> str:
    """``Qwen/Qwen3-VL-8B-Instruct``, ``/models/Qwen3-VL-8B-Instruct/`` and a hub-cache snapshot
    ``.../models--Qwen--Qwen3-VL-8B-Instruct/snapshots/<sha>`` all give ``qwen3-vl-8b-instruct``."""
    s = str(name).strip().rstrip("/\\")
    m = re.search(r"models--[^/\\]+--([^/\\]+)[/\\]snapshots[/\\][^/\\]+$", s)
    if m:
        return m.group(1).lower()
    return re.split(r"[/\\]", s)[-1].lower()


def check_adapter_checkpoint(src: AdapterSource, base_model_names: Sequence[str] = ()) -> dict[str, Any]:
    """Refuse, before loading anything, a checkpoint that is missing or made for another base model.

    The base-model check is deliberately loose: it compares only the *basename* of
    ``adapter_config.json``'s ``base_model_name_or_path`` with the basenames of the
    registry's ``base_model`` (as written and as resolved), lowercased, and only when
    both are set. So ``Qwen/Qwen3-VL-8B-Instruct``, a local ``.../Qwen3-VL-8B-Instruct``
    folder and a hub-cache snapshot of it all match, while an adapter trained on
    ``Qwen3-VL-2B-Instruct`` is refused. A real mismatch of shapes is caught anyway
    when the weights load (see :func:`load_adapters`).
    """
    p = src.path
    if not p.exists():
        raise src.err(f"checkpoint folder for adapter {src.name!r} not found: {p}",
                      fix="train the adapter or fix the path (it resolves against the registry's folder)")
    cfg_path = p / "adapter_config.json"
    if not cfg_path.is_file():
        raise src.err(f"checkpoint for adapter {src.name!r} is not a PEFT adapter folder "
                      f"(no adapter_config.json): {p}", fix="point at the folder `save_pretrained` wrote")
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise TypeError("top level is not an object")
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise src.err(f"adapter {src.name!r}: {cfg_path} is not valid JSON ({e})",
                      fix="re-save the adapter with peft's save_pretrained") from None
    if not any(f.is_file() for f in (p / "adapter_model.safetensors", p / "adapter_model.bin")):
        raise src.err(f"checkpoint for adapter {src.name!r} has no adapter_model.safetensors: {p}",
                      fix="re-save the adapter with peft's save_pretrained")
    made_for = cfg.get("base_model_name_or_path")
    names = [n for n in base_model_names if n]
    if made_for and names and _model_basename(made_for) not in {_model_basename(n) for n in names}:
        raise src.err(f"adapter {src.name!r} ({p}) was made for base model {made_for!r}, but the registry's "
                      f"base_model is {names[0]!r}",
                      fix=f"use an adapter trained on {names[0]!r}, or, if {made_for!r} is the same weights under "
                          "another name, load with check_base_model=False")
    return cfg


def _same_base_model(recorded: str, reg: Registry) -> bool:
    """router.json's ``base_model`` names the registry's base model: as written in registry.yaml,
    or -- for a local folder -- resolved against the registry's folder (relative or absolute)."""
    if recorded in (reg.model.base_model, reg.base_model):
        return True
    local = reg.resolve(reg.model.base_model)
    rec = Path(recorded).expanduser()
    if not rec.is_absolute():
        rec = reg.resolve(recorded)
    return local.exists() and rec.exists() and os.path.realpath(rec) == os.path.realpath(local)


def load_adapters(base, sources: Sequence[AdapterSource]):
    """Wrap ``base`` (modified in place) in ONE ``PeftModel`` holding every adapter by name.

    Errors name the adapter and its checkpoint folder: a shape mismatch (a LoRA made
    for a model with another hidden size), target modules the base does not have, or
    weights missing from the checkpoint.
    """
    from peft import PeftModel

    if not sources:
        raise InputError("no adapters to load (fix: register one with `router add-adapter NAME`)")
    device = str(next(base.parameters()).device)
    model = None
    for src in sources:
        fix = "use an adapter trained for this base model (or retrain it on it)"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if model is None:
                    model = PeftModel.from_pretrained(base, str(src.path), adapter_name=src.name, is_trainable=False)
                    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
                else:
                    result = model.load_adapter(str(src.path), adapter_name=src.name, is_trainable=False,
                                                torch_device=device)
                    missing = list(result.missing_keys)
            except RuntimeError as e:  # size mismatch from load_state_dict
                first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
                raise src.err(f"adapter {src.name!r} ({src.path}) does not fit the base model: {first}", fix=fix) \
                    from None
            except (ValueError, KeyError, TypeError, OSError) as e:
                raise src.err(f"adapter {src.name!r} ({src.path}) cannot be loaded: {type(e).__name__}: {e}",
                              fix=fix) from None
        for w in caught:  # keep peft's other warnings visible, except library-internal deprecations
            if "missing adapter keys" not in str(w.message) and not issubclass(w.category, (FutureWarning,
                                                                                           DeprecationWarning)):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if missing:
            raise src.err(f"adapter {src.name!r} ({src.path}) lacks weights for modules the config targets: "
                          f"{str(missing[0])[:200]}", fix="re-save the adapter with peft's save_pretrained")
    model.eval()
    model.requires_grad_(False)
    return model


def adapters_in(module) -> set[str]:
    """Names of the PEFT adapters that have weights somewhere inside ``module``."""
    found: set[str] = set()
    for m in module.modules():
        for attr in getattr(m, "adapter_layer_names", ()):
            v = getattr(m, attr, None)
            if hasattr(v, "keys"):
                found |= set(v.keys())
    return found


def vision_adapters(model) -> set[str]:
    """Adapters with weights in the vision tower (their image features differ from the base's)."""
    return adapters_in(inner_vl_model(model).visual)


# ---- the engine -------------------------------------------------------------------------

class Engine:
    """One base model + every adapter + the router head. Build with :meth:`from_registry`.

    The constructor takes already-loaded parts, for embedding the engine in a program
    that loads the model itself: ``model`` must be a ``PeftModel`` over Qwen3-VL holding
    an adapter for each name in ``meta.adapters`` (see :func:`load_adapters`).
    """

    def __init__(self, model, processor, head, meta: RouterMeta, *, plugin_manager: pluggy.PluginManager | None = None,
                 min_confidence: float = 0.0, fallback: str = "base") -> None:
        import torch

        if not hasattr(model, "peft_config") or not hasattr(model, "disable_adapter"):
            raise InputError(f"Engine needs a PeftModel holding the adapters, got {type(model).__name__} "
                             "(fix: build it with vlrouter.core.engine.load_adapters or Engine.from_registry)")
        missing = [n for n in meta.adapters if n not in model.peft_config]
        if missing:
            raise InputError(f"the router's adapters {missing} are not loaded in the model (loaded: "
                             f"{list(model.peft_config)}) (fix: load every adapter named in router.json)")
        if fallback not in FALLBACKS and fallback not in meta.adapters:
            raise InputError(f"fallback {fallback!r} is not 'base', 'error' or an adapter of the router "
                             f"({', '.join(meta.adapters)})")
        if not 0.0 <= float(min_confidence) <= 1.0:
            raise InputError(f"min_confidence {min_confidence} is outside [0, 1]")
        hidden = int(model.get_base_model().config.text_config.hidden_size)
        if meta.hidden_size != hidden:
            raise StaleRouterError(located("router.json", "hidden_size", f"stale router: trained on features of size "
                                           f"{meta.hidden_size}, the base model's hidden size is {hidden}",
                                           fix="run `router retrain`"))
        if meta.temperature <= 0:
            raise InputError(f"router.json temperature {meta.temperature} must be > 0 (fix: `router retrain`)")
        self.model = model
        self.processor = processor
        self.head = head.to("cpu").float().eval()
        self.meta = meta
        self.min_confidence = float(min_confidence)
        self.fallback = fallback
        if plugin_manager is None:
            from vlrouter.plugins.manager import get_plugin_manager

            plugin_manager = get_plugin_manager()
        self.plugin_manager = plugin_manager
        self._inner = inner_vl_model(model)
        self.vision_adapters: frozenset[str] = frozenset(vision_adapters(model))
        self.device = next(model.parameters()).device
        self._lock = threading.RLock()
        self._prep_lock = threading.Lock()
        self._torch = torch

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_registry(cls, path: str | Path | Registry = "registry.yaml", device: str | None = None,
                      dtype: str | None = None, *, plugin_manager: pluggy.PluginManager | None = None,
                      check_base_model: bool = True) -> Engine:
        """Load registry.yaml, the router, the base model once, and every adapter into one PeftModel.

        Refuses a stale router (adapter set or order, base model, pooling, layer or
        hidden size differ from the registry's) with the fix ``router retrain``, and a
        missing or mismatched adapter checkpoint, naming the adapter, its path and the
        registry field -- all before the base model is loaded where possible.
        ``dtype`` defaults to registry ``router.dtype``.
        """
        from vlrouter.core.registry import Registry, _line_of

        reg = path if isinstance(path, Registry) else Registry.load(path)
        m = reg.model
        if not m.adapters:
            raise RegistryError(located(reg.path, "adapters", "no adapters registered",
                                        fix="add one with `router add-adapter NAME`"))
        head, meta = load_router(reg.router_dir)
        check_compatible(meta, adapters=reg.adapter_names, base_model=None if _same_base_model(meta.base_model, reg) else m.base_model,
                         pooling=m.router.pooling, layer=m.router.layer, where=reg.router_dir / META_FILE)
        sources = [
            AdapterSource(a.name, reg.resolve(a.checkpoint), reg.path, f"adapters[{i}].checkpoint",
                          _line_of(reg._doc, ("adapters", i, "checkpoint")))
            for i, a in enumerate(m.adapters)
        ]
        for src in sources:
            check_adapter_checkpoint(src, [m.base_model, reg.base_model] if check_base_model else [])
        processor = load_processor(reg.base_model, revision=m.base_model_revision)
        base = load_base_model(reg.base_model, device=device, dtype=dtype or m.router.dtype,
                               revision=m.base_model_revision)
        hidden = int(base.config.text_config.hidden_size)
        if meta.hidden_size != hidden:
            raise StaleRouterError(located(reg.router_dir / META_FILE, "hidden_size",
                                           f"stale router: trained on features of size {meta.hidden_size}, "
                                           f"{m.base_model!r} has hidden size {hidden}", fix="run `router retrain`"))
        model = load_adapters(base, sources)
        if plugin_manager is None:
            from vlrouter.plugins.manager import get_plugin_manager

            plugin_manager = get_plugin_manager(reg)
        engine = cls(model, processor, head, meta, plugin_manager=plugin_manager,
                     min_confidence=m.router.min_confidence, fallback=m.router.fallback)
        engine._note_sources(reg, sources)  # for reload(): where this engine came from
        return engine

    # ---- properties ---------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """The router's labels, in label order (from router.json)."""
        return list(self.meta.adapters)

    @property
    def base_model(self):
        """The one Qwen3-VL (``Qwen3VLForConditionalGeneration``) inside the PeftModel."""
        return self.model.get_base_model()

    # ---- preprocessing ------------------------------------------------------------------
    def _prepare(self, items: Sequence[tuple[Any, str]]):
        if not items:
            raise InputError("no (image, prompt) items given (fix: pass at least one)")
        images, prompts = [], []
        for i, (image, prompt) in enumerate(items):
            label = f"item {i}: " if len(items) > 1 else ""
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"{label}prompt is empty (fix: pass the instruction text, e.g. 'Click March 29')")
            where = None if isinstance(image, (str, Path)) or len(items) == 1 else f"item {i} image"
            images.append(open_image(image, where=where))
            prompts.append(prompt)
        with self._prep_lock:
            batch = build_inputs(self.processor, images, prompts)
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}

    # ---- routing ------------------------------------------------------------------------
    def _features(self, batch):
        """Pooled base-model features, adapters disabled, exactly as for training."""
        with self.model.disable_adapter():
            return encode_pooled(self.model, batch, layer=self.meta.layer, pooling=self.meta.pooling)

    def _routes(self, feats) -> list[Route]:
        torch = self._torch
        with torch.inference_mode():
            logits = self.head(feats.float())
            probs = torch.softmax(logits / float(self.meta.temperature), dim=-1)
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Route(self.meta.adapters[best], float(row[best]),
                             {n: float(p) for n, p in zip(self.meta.adapters, row)}))
        return out

    def embed(self, images: Sequence, prompts: Sequence[str]):
        """The router's input features for a batch (fp32 ``[B, H]`` on CPU), base model, adapters off."""
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} images for {len(prompts)} prompts")
        batch = self._prepare(list(zip(images, prompts)))
        with self._lock:
            return self._features(batch)

    def route(self, image, prompt: str) -> Route:
        """Which adapter should act on (image, prompt). ``image``: a PIL image, a path or bytes."""
        return self.route_batch([(image, prompt)])[0]

    def route_batch(self, items: Sequence[tuple[Any, str]]) -> list[Route]:
        batch = self._prepare(items)
        with self._lock:
            return self._routes(self._features(batch))

    # ---- acting -------------------------------------------------------------------------
    def _decide(self, route: Route, index: int | None = None) -> str:
        """The adapter that generates: the routed one, or ``router.fallback`` below ``min_confidence``."""
        if route.confidence >= self.min_confidence:
            return route.adapter
        if self.fallback == "error":
            item = f"item {index}: " if index is not None else ""
            raise LowConfidenceError(
                f"{item}router confidence {route.confidence:.3f} for {route.adapter!r} is below router.min_confidence="
                f"{self.min_confidence} and router.fallback is 'error' (fix: lower router.min_confidence, set "
                "router.fallback to base or an adapter, or add training data and `router retrain`)")
        return self.fallback  # "base" or an adapter name

    @contextmanager
    def _reuse_image_features(self) -> Iterator[dict]:
        """During one call, hand the vision features of the routing pass to the generation pass.

        Wraps the inner ``Qwen3VLModel.get_image_features`` (called both by its
        ``forward`` and by ``generate`` before prefill) with a cache keyed by the
        ``pixel_values`` tensor's identity and the image grid. The returned object holds
        ``enabled``: set it False to make the next pass encode the image again.
        """
        inner = self._inner
        had_own = "get_image_features" in inner.__dict__
        original = inner.get_image_features
        state: dict[str, Any] = {"enabled": True, "entries": [], "vision_calls": 0}

        @functools.wraps(original)
        def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
            if state["enabled"]:
                for pv, grid, out in state["entries"]:
                    if pv is pixel_values and (grid is image_grid_thw or (
                            grid is not None and image_grid_thw is not None and self._torch.equal(grid, image_grid_thw))):
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

    def _generation_kwargs(self, max_new_tokens: int, generate_kwargs: dict) -> dict:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        for k in ("adapter_names", "input_ids", "pixel_values", "attention_mask"):
            if k in generate_kwargs:
                raise InputError(f"generate argument {k!r} is set by the engine (fix: drop it)")
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False}
        gc = self.base_model.generation_config
        if gc.pad_token_id is None:
            kw["pad_token_id"] = self.processor.tokenizer.pad_token_id
        kw.update(generate_kwargs)
        return kw

    def _generate(self, batch, adapters: Sequence[str], gen_kwargs: dict) -> list[str]:
        """One ``generate`` call for the batch; ``adapters[i]`` is an adapter name or ``"base"``."""
        torch = self._torch
        model = self.model
        uniq = set(adapters)
        with torch.inference_mode():
            if uniq == {BASE}:
                with model.disable_adapter():
                    out = model.generate(**batch, **gen_kwargs)
            elif len(uniq) == 1:
                model.set_adapter(adapters[0], inference_mode=True)
                out = model.generate(**batch, **gen_kwargs)
            else:
                names = [PEFT_BASE if a == BASE else a for a in adapters]
                out = model.generate(**batch, adapter_names=names, **gen_kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        with self._prep_lock:
            return self.processor.batch_decode(new, skip_special_tokens=True)

    def _parse(self, adapter: str, text: str) -> UIAction | None:
        from vlrouter.plugins.manager import parse_action

        return parse_action(self.plugin_manager, adapter, text)

    def act(self, image, prompt: str, max_new_tokens: int = 64, *, adapter: str | None = None,
            **generate_kwargs) -> Action:
        """Route, then generate with the chosen adapter, then parse the action.

        Greedy unless ``generate_kwargs`` say otherwise (they go to ``generate``).
        The image is encoded once when the generating adapter leaves the vision tower alone.
        ``adapter`` (an adapter name or ``"base"``) skips routing and generates with that
        adapter: the Action's ``routed`` is that name, ``confidence`` 1.0, ``probs`` empty.
        """
        t0 = time.perf_counter()
        gen_kwargs = self._generation_kwargs(max_new_tokens, generate_kwargs)
        batch = self._prepare([(image, prompt)])
        with self._lock, self._reuse_image_features() as reuse:
            if adapter is None:
                route = self._routes(self._features(batch))[0]
                adapter = self._decide(route)
            else:
                route = self._forced_route(adapter)
            t1 = time.perf_counter()
            reuse["enabled"] = adapter not in self.vision_adapters
            text = self._generate(batch, [adapter], gen_kwargs)[0]
            t2 = time.perf_counter()
        parsed = self._parse(adapter, text)
        t3 = time.perf_counter()
        timings = {"route_ms": (t1 - t0) * 1e3, "generate_ms": (t2 - t1) * 1e3, "total_ms": (t3 - t0) * 1e3,
                   "vision_calls": reuse["vision_calls"]}
        return Action(adapter, route.confidence, text, parsed, timings, routed=route.adapter, probs=route.probs)

    def act_batch(self, items: Sequence[tuple[Any, str]], max_new_tokens: int = 64, *,
                  adapters: Sequence[str | None] | None = None, **generate_kwargs) -> list[Action]:
        """Route every (image, prompt), then generate them all in ONE call with mixed adapters.

        Rows are left padded; each row runs with its own adapter (peft's
        ``adapter_names``; ``"__base__"`` for a base fallback). Greedy results equal
        per-item :meth:`act`. One exception: when different adapters in the batch have
        weights inside the vision tower, peft cannot mix them there (the vision tower
        sees image patches, not batch rows, and peft refuses ``adapter_names``), so the
        batch is generated in one call per adapter. ``adapters`` (one entry per item:
        an adapter name, ``"base"``, or None to route) forces rows, as ``act(adapter=)``;
        the routing pass is skipped when every row is forced.
        """
        items = list(items)
        t0 = time.perf_counter()
        gen_kwargs = self._generation_kwargs(max_new_tokens, generate_kwargs)
        forced = list(adapters) if adapters is not None else [None] * len(items)
        if len(forced) != len(items):
            raise InputError(f"got {len(forced)} adapters for {len(items)} items (fix: one entry per item, "
                             "None to route)")
        batch = self._prepare(items)
        with self._lock, self._reuse_image_features() as reuse:
            routed = self._routes(self._features(batch)) if None in forced else [None] * len(items)
            routes = [r if f is None else self._forced_route(f) for r, f in zip(routed, forced)]
            chosen = [self._decide(r, i) if f is None else r.adapter for i, (r, f) in enumerate(zip(routes, forced))]
            t1 = time.perf_counter()
            touches_vision = bool(set(chosen) & self.vision_adapters)
            reuse["enabled"] = not touches_vision
            if touches_vision and len(set(chosen)) > 1:
                texts: list[str] = [""] * len(items)
                for name in dict.fromkeys(chosen):
                    idx = [i for i, a in enumerate(chosen) if a == name]
                    sub = self._prepare([items[i] for i in idx])
                    for i, t in zip(idx, self._generate(sub, [name] * len(idx), gen_kwargs)):
                        texts[i] = t
            else:
                texts = self._generate(batch, chosen, gen_kwargs)
            t2 = time.perf_counter()
        parsed = [self._parse(a, t) for a, t in zip(chosen, texts)]
        t3 = time.perf_counter()
        timings = {"route_ms": (t1 - t0) * 1e3, "generate_ms": (t2 - t1) * 1e3, "total_ms": (t3 - t0) * 1e3,
                   "vision_calls": reuse["vision_calls"], "batch_size": len(items)}
        return [Action(a, r.confidence, t, p, dict(timings), routed=r.adapter, probs=r.probs)
                for a, r, t, p in zip(chosen, routes, texts, parsed)]

    # ---- serving: forced adapters, the model lock, reloading a promoted router ----------
    # Appended for `router serve` (vlrouter/serve/): everything below is used by the server
    # and its reload watcher; the methods above only call _forced_route and _note_sources.

    registry_path: Path | None = None  # the registry.yaml from_registry read (reload() re-reads it)

    @property
    def lock(self) -> threading.RLock:
        """The model lock (re-entrant). Hold it to run calls with nothing in between, e.g.
        ``torch.manual_seed(s)`` then a sampled :meth:`act_batch`; a reload waits for it too."""
        return self._lock

    @property
    def router_version(self) -> str | None:
        """The router folder this engine routes with (the live symlink's resolved target), if known."""
        return self.__dict__.get("_router_version")

    def _forced_route(self, name: str) -> Route:
        """The Route of a row whose adapter the caller chose (``act(adapter=)``): no routing pass."""
        if name != BASE and name not in self.meta.adapters:
            raise UnknownAdapterError(f"unknown adapter {name!r} (fix: one of {BASE}, {', '.join(self.meta.adapters)})")
        return Route(name, 1.0, {})

    def _note_sources(self, reg: Registry, sources: Sequence[AdapterSource], version: str | Path | None = None) -> None:
        self.registry_path = reg.path
        self._router_version = str(version or os.path.realpath(reg.router_dir))
        self._adapter_stamps = {s.name: _checkpoint_stamp(s.path) for s in sources}

    def reload(self, registry: str | Path | Registry | None = None, *, check_base_model: bool = True) -> ReloadResult:
        """Switch to registry.yaml's live router without a restart (what ``router serve`` does on promotion).

        Reads registry.yaml (default: the one :meth:`from_registry` read), resolves the live
        router symlink once and loads that version's head; checks it matches the registry
        (:class:`StaleRouterError` otherwise -- e.g. between ``router add-adapter``'s
        promotion and its registry save: try again later) and the running base model; then
        :meth:`swap_router`. The registry's ``plugin:`` modules are registered, and its
        ``router.min_confidence`` / ``router.fallback`` apply. On any error the engine keeps
        the router it had.
        """
        from vlrouter.core.registry import Registry, _line_of
        from vlrouter.plugins.manager import load_module_plugin

        target = registry if registry is not None else self.registry_path
        if target is None:
            raise InputError("this engine was not loaded from a registry, so it cannot reload one "
                             "(fix: pass registry='registry.yaml')")
        reg = target if isinstance(target, Registry) else Registry.load(target)
        m = reg.model
        version = Path(os.path.realpath(reg.router_dir))  # one version: both files come from it
        head, meta = load_router(version)
        check_compatible(meta, adapters=reg.adapter_names,
                         base_model=None if _same_base_model(meta.base_model, reg) else m.base_model,
                         pooling=m.router.pooling, layer=m.router.layer, where=reg.router_dir / META_FILE)
        running = getattr(self.base_model, "name_or_path", None)
        if running and reg.base_model != running and not _same_path(reg.base_model, running):
            raise ModelLoadError(located(reg.path, "base_model", f"base_model changed from {running!r} to "
                                         f"{reg.base_model!r}; a running engine cannot swap its base model",
                                         fix="restart (`router serve`) to load the new base model"))
        sources = [AdapterSource(a.name, reg.resolve(a.checkpoint), reg.path, f"adapters[{i}].checkpoint",
                                 _line_of(reg._doc, ("adapters", i, "checkpoint")))
                   for i, a in enumerate(m.adapters)]
        stamps = self.__dict__.get("_adapter_stamps", {})
        for src in sources:
            if src.name not in self.model.peft_config or stamps.get(src.name, _checkpoint_stamp(src.path)) != \
                    _checkpoint_stamp(src.path):
                check_adapter_checkpoint(src, [m.base_model, reg.base_model] if check_base_model else [])
        for i, entry in enumerate(m.adapters):
            if entry.plugin:
                load_module_plugin(self.plugin_manager, entry.plugin, where=(reg.path, f"adapters[{i}].plugin"))
        result = self.swap_router(head, meta, sources, min_confidence=m.router.min_confidence,
                                  fallback=m.router.fallback, version=version)
        self.registry_path = reg.path
        return result

    def swap_router(self, head, meta: RouterMeta, sources: Sequence[AdapterSource], *,
                    min_confidence: float | None = None, fallback: str | None = None,
                    version: str | Path | None = None) -> ReloadResult:
        """Make (``head``, ``meta``) this engine's router, loading and dropping LoRAs to match.

        ``sources`` names the checkpoint of every adapter in ``meta.adapters``. Under the
        model lock (a call in flight finishes first; calls arriving meanwhile wait): load
        the adapters the model lacks into the running ``PeftModel``, reload those whose
        checkpoint files changed, check the new router against the model exactly as the
        constructor does, drop the adapters the new router no longer names, then switch
        head, labels, threshold and fallback at once. If a load or check fails, the added
        adapters are removed again and the old router stays.
        """
        by_name = {s.name: s for s in sources}
        missing = [n for n in meta.adapters if n not in by_name]
        if missing:
            raise InputError(f"no checkpoint given for the router's adapters {missing} (fix: pass an AdapterSource "
                             "for every name in router.json)")
        min_confidence = self.min_confidence if min_confidence is None else min_confidence
        fallback = self.fallback if fallback is None else fallback
        with self._lock:
            model = self.model
            stamps = dict(self.__dict__.get("_adapter_stamps", {}))
            new = [by_name[n] for n in meta.adapters if n not in model.peft_config]
            changed = [by_name[n] for n in meta.adapters if n in model.peft_config and n in stamps
                       and stamps[n] != _checkpoint_stamp(by_name[n].path)]
            dropped = [n for n in model.peft_config if n not in meta.adapters]
            loaded: list[str] = []
            try:
                for src in changed:  # same name, new weights: drop the old ones, load the new
                    _delete_adapter(model, src.name)
                    loaded.append(src.name)
                    _load_adapter(model, src)
                for src in new:
                    loaded.append(src.name)
                    _load_adapter(model, src)
                checked = Engine(model, self.processor, head, meta, plugin_manager=self.plugin_manager,
                                 min_confidence=min_confidence, fallback=fallback)
            except BaseException:
                for name in loaded:
                    if name in model.peft_config:
                        _delete_adapter(model, name)
                for src in changed:  # put the old weights back (best effort: their files may be gone)
                    old = stamps[src.name][0]
                    try:
                        _load_adapter(model, AdapterSource(src.name, Path(old)))
                    except RouterError:
                        pass
                raise
            for name in dropped:
                _delete_adapter(model, name)
            model.eval()
            model.requires_grad_(False)
            self.head, self.meta = checked.head, meta
            self.min_confidence, self.fallback = checked.min_confidence, checked.fallback
            self.vision_adapters = frozenset(vision_adapters(model))
            for name in dropped:
                stamps.pop(name, None)
            for src in [*changed, *new]:
                stamps[src.name] = _checkpoint_stamp(src.path)
            self._adapter_stamps = stamps
            if version is not None:
                self._router_version = str(version)
        return ReloadResult(router=None if version is None else str(version), adapters=list(meta.adapters),
                            added=[s.name for s in new], removed=dropped, replaced=[s.name for s in changed])


def _copy_output(out):
    """A shallow copy of a vision output, so a consumer that reassigns its fields cannot change the cache."""
    new = copy.copy(out)
    for key in ("pooler_output", "deepstack_features"):
        v = getattr(out, key, None)
        if isinstance(v, list):
            setattr(new, key, list(v))
    return new


# ---- serving helpers (reload) -------------------------------------------------------------

@dataclass(frozen=True)
class ReloadResult:
    """What :meth:`Engine.reload` / :meth:`Engine.swap_router` changed."""

    router: str | None  # the router version folder now live in the engine
    adapters: list[str]  # the router's labels, in order
    added: list[str] = field(default_factory=list)  # LoRAs loaded into the running model
    removed: list[str] = field(default_factory=list)  # LoRAs dropped from it
    replaced: list[str] = field(default_factory=list)  # same name, checkpoint files changed: reloaded

    def to_dict(self) -> dict[str, Any]:
        return {"router": self.router, "adapters": list(self.adapters), "added": list(self.added),
                "removed": list(self.removed), "replaced": list(self.replaced)}


def _checkpoint_stamp(path: Path) -> tuple:
    """(resolved folder, size and mtime of each checkpoint file): changes when the checkpoint is rewritten."""
    path = Path(path)
    files = []
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        try:
            st = (path / name).stat()
            files.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            pass
    return (os.path.realpath(path), tuple(files))


def _same_path(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b)


def _load_adapter(model, src: AdapterSource) -> None:
    """Load one more PEFT checkpoint into a running ``PeftModel`` (errors as :func:`load_adapters`'s)."""
    device = str(next(model.parameters()).device)
    fix = "use an adapter trained for this base model (or retrain it on it)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            result = model.load_adapter(str(src.path), adapter_name=src.name, is_trainable=False, torch_device=device)
        except RuntimeError as e:  # size mismatch from load_state_dict
            first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            raise src.err(f"adapter {src.name!r} ({src.path}) does not fit the base model: {first}", fix=fix) from None
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise src.err(f"adapter {src.name!r} ({src.path}) cannot be loaded: {type(e).__name__}: {e}",
                          fix=fix) from None
    if result.missing_keys:
        raise src.err(f"adapter {src.name!r} ({src.path}) lacks weights for modules the config targets: "
                      f"{str(result.missing_keys[0])[:200]}", fix="re-save the adapter with peft's save_pretrained")


def _delete_adapter(model, name: str) -> None:
    """Drop one adapter's LoRA weights from a running ``PeftModel`` (another adapter becomes the active one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns when the active adapter is deleted: we never rely on it
        model.delete_adapter(name)
