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

Scale (``engine:`` in registry.yaml): ``max_loaded_adapters: N`` keeps at most N LoRAs in
the model (:class:`~vlrouter.core.residency.AdapterPool`: loaded on first use, least
recently used evicted; a batch naming more is generated in groups of at most N);
``generation: vllm`` routes here and generates on a vLLM server
(:class:`~vlrouter.core.vllm.VLLMClient`), with no LoRA weights loaded locally.

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

import math
import os
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pluggy

from vlrouter.core.actions import UIAction
from vlrouter.core.encoder import build_inputs, load_base_model, load_processor, set_prompt_token_limit
from vlrouter.core.errors import (
    InputError,
    LowConfidenceError,
    ModelLoadError,
    RegistryError,
    StaleRouterError,
    UnknownAdapterError,
    located,
)
from vlrouter.core.images import open_image
from vlrouter.core.lora import AdapterSource, activate, adapters_off, check_adapter_checkpoint, checkpoint_stamp
from vlrouter.core.ood import OODModel
from vlrouter.core.registry import Registry
from vlrouter.core.residency import AdapterPool
from vlrouter.core.results import BASE, Action, ReloadResult, Route
from vlrouter.core.store import META_FILE, RouterMeta, check_router_for, read_router
from vlrouter.core.views import (
    LAYOUT,
    TokenIds,
    encode_views,
    inner_vl_model,
    num_text_layers,
    resolve_layer,
    view_key,
)
from vlrouter.core.vision import reuse_image_features
from vlrouter.core.vllm import VLLMClient
from vlrouter.plugins.manager import get_plugin_manager, load_module_plugin, parse_action

__all__ = ["BASE", "Action", "Engine", "ReloadResult", "Route"]

PEFT_BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
FALLBACKS = ("base", "error")


# ---- the engine -------------------------------------------------------------------------

class Engine:
    """One base model + every adapter + the router head. Build with :meth:`from_registry`.

    The constructor takes already-loaded parts, for embedding the engine in a program
    that loads the model itself: ``model`` must be a ``PeftModel`` over Qwen3-VL holding
    an adapter for each name in ``meta.adapters`` (see :func:`load_adapters`), or ``pool``
    an :class:`AdapterPool` knowing each; with ``remote`` (a :class:`VLLMClient`) it is the
    plain base model and generation runs on the vLLM server.
    """

    def __init__(self, model, processor, head, meta: RouterMeta, *, plugin_manager: pluggy.PluginManager | None = None,
                 min_confidence: float = 0.0, fallback: str = "base", ood: OODModel | None = None,
                 pool: AdapterPool | None = None, remote: VLLMClient | None = None) -> None:
        import torch

        peft = hasattr(model, "peft_config") and hasattr(model, "disable_adapter")
        if remote is None and not peft:
            raise InputError(located(None, "model", f"Engine needs a PeftModel holding the adapters, got "
                                     f"{type(model).__name__}",
                                     fix="build it with vlrouter.core.lora.load_adapters or Engine.from_registry"))
        if remote is None:
            pool = pool if pool is not None else AdapterPool(model)
            missing = [n for n in meta.adapters if n not in pool.known]
            if missing:
                raise InputError(located(None, "model", f"the router's adapters {missing} are not loaded in the model "
                                         f"(loaded: {pool.resident})", fix="load every adapter named in router.json"))
        if fallback not in FALLBACKS and fallback not in meta.adapters:
            raise InputError(located(None, "fallback", f"{fallback!r} is not 'base', 'error' or an adapter of the "
                                     f"router ({', '.join(meta.adapters)})", fix="pass one of those"))
        if not 0.0 <= float(min_confidence) <= 1.0:
            raise InputError(located(None, "min_confidence", f"{min_confidence} is outside [0, 1]",
                                     fix="pass a probability between 0 and 1"))
        hidden = int((model.get_base_model() if peft else model).config.text_config.hidden_size)
        if meta.hidden_size != hidden:
            raise StaleRouterError(located("router.json", "hidden_size", f"stale router: trained on features of size "
                                           f"{meta.hidden_size}, the base model's hidden size is {hidden}",
                                           fix="run `router retrain`"))
        if meta.temperature <= 0:
            raise InputError(located(META_FILE, "temperature", f"{meta.temperature} must be > 0",
                                     fix="run `router retrain`"))
        n_layers = num_text_layers(model)
        if meta.num_layers is None:  # a format-1 router: its layer may count from the end
            meta = meta.model_copy(update={"num_layers": n_layers})
        self.representation = meta.representation()
        resolve_layer(self.representation.layer, n_layers, where=f"{META_FILE}: layer")
        width = self.representation.width(hidden)
        if meta.head.in_dim != width:
            raise StaleRouterError(located(META_FILE, "head.in_dim", f"the head reads {meta.head.in_dim} features, "
                                           f"but {self.representation.label} gives {width}",
                                           fix="run `router retrain`"))
        self.model = model
        self._pool, self._remote = (None, remote) if remote is not None else (pool, None)
        self.processor = processor
        self.head = head.to("cpu").float().eval()
        self.meta = meta
        self.ood = ood
        self.token_ids = TokenIds.of(self.base_model, processor)
        self.min_confidence = float(min_confidence)
        self.fallback = fallback
        self.plugin_manager = plugin_manager if plugin_manager is not None else get_plugin_manager()
        self._inner = inner_vl_model(model)
        self.vision_adapters: frozenset[str] = self._pool.vision_adapters() if self._pool else frozenset()
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
        reg = path if isinstance(path, Registry) else Registry.load(path)
        m = reg.model
        if not m.adapters:
            raise RegistryError(located(reg.path, "adapters", "no adapters registered",
                                        fix="add one with `router add-adapter NAME`"))
        reg.check_base_model()
        router = read_router(reg.router_dir)
        meta = router.meta
        check_router_for(meta, reg)
        sources = [
            AdapterSource(a.name, reg.resolve(a.checkpoint), reg.path, f"adapters[{i}].checkpoint",
                          reg.line_of(("adapters", i, "checkpoint")))
            for i, a in enumerate(m.adapters)
        ]
        remote = VLLMClient.from_registry(reg) if m.engine.generation == "vllm" else None
        for src in sources if remote is None else ():  # with vLLM the adapters live on the vLLM server
            check_adapter_checkpoint(src, [m.base_model, reg.base_model] if check_base_model else [])
        processor = load_processor(reg.base_model, revision=m.base_model_revision)
        set_prompt_token_limit(processor, m.router.max_prompt_tokens)
        base = load_base_model(reg.base_model, device=device, dtype=dtype or m.router.dtype,
                               revision=m.base_model_revision)
        hidden = int(base.config.text_config.hidden_size)
        if meta.hidden_size != hidden:
            raise StaleRouterError(located(reg.router_dir / META_FILE, "hidden_size",
                                           f"stale router: trained on features of size {meta.hidden_size}, "
                                           f"{m.base_model!r} has hidden size {hidden}", fix="run `router retrain`"))
        pool = AdapterPool.load(base, sources, m.engine.max_loaded_adapters) if remote is None else None
        if plugin_manager is None:
            plugin_manager = get_plugin_manager(reg)
        engine = cls(pool.model if pool else base, processor, router.head, meta, plugin_manager=plugin_manager,
                     min_confidence=m.router.min_confidence, fallback=m.router.fallback,
                     ood=router.ood if m.router.ood != "off" else None, pool=pool, remote=remote)
        engine._note_sources(reg, sources, router.dir)  # for reload(): where this engine came from
        return engine

    def __repr__(self) -> str:
        dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        base = getattr(self.base_model.config, "_name_or_path", "") or type(self.base_model).__name__
        return (f"Engine(adapters={self.adapters}, base_model={base!r}, device={str(self.device)!r}, "
                f"dtype={dtype!r}, min_confidence={self.min_confidence}, fallback={self.fallback!r}, "
                f"temperature={self.meta.temperature:g}, router_created={self.meta.created_at!r})")

    # ---- properties ---------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """The router's labels, in label order (from router.json)."""
        return list(self.meta.adapters)

    @property
    def base_model(self):
        """The one Qwen3-VL (``Qwen3VLForConditionalGeneration``), inside the PeftModel when there is one."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def pool(self) -> AdapterPool | None:
        """Which adapters are loaded (None with ``generation: vllm``: none are)."""
        return self._pool

    # ---- preprocessing ------------------------------------------------------------------
    def _prepare(self, items: Sequence[tuple[Any, str]] | None, opened: tuple[list, list] | None = None):
        """The processor's batch for ``items`` (or for already ``opened`` (images, prompts))."""
        images, prompts = opened if opened is not None else self._open(items)
        with self._prep_lock:
            batch = build_inputs(self.processor, images, prompts)
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}

    def _open(self, items: Sequence[tuple[Any, str]]) -> tuple[list, list]:
        if not items:
            raise InputError(located(None, "items", "no (image, prompt) items given", fix="pass at least one"))
        images, prompts = [], []
        for i, (image, prompt) in enumerate(items):
            label = f"item {i}: " if len(items) > 1 else ""
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(located(None, label.rstrip(": ") or None, "prompt is empty",
                                         fix="pass the instruction text, e.g. 'Click March 29'"))
            where = None if isinstance(image, (str, Path)) or len(items) == 1 else f"item {i} image"
            images.append(open_image(image, where=where))
            prompts.append(prompt)
        return images, prompts

    # ---- routing ------------------------------------------------------------------------
    def _features(self, batch):
        """The head's input ``[B, D]`` and, for the OOD score, the screenshot views it reads (``image-std``,
        ``layout``; None when not read): the router's views at its layer, base model with adapters disabled,
        exactly as for training; the pass stops after that layer."""
        rep = self.representation
        wanted = tuple(dict.fromkeys(rep.views + (self.ood.screen_views if self.ood is not None else ())))
        with adapters_off(self.model) if self._pool is not None else nullcontext():
            views = encode_views(self.model, batch, [rep.layer], wanted, token_ids=self.token_ids)
        return rep.features(views), {"content": views.get(view_key("image-std", rep.layer)),
                                     "layout": views.get(view_key(LAYOUT, rep.layer))}

    def _routes(self, feats, screen=None) -> list[Route]:
        """Routes from the head's features (and the screenshot's ``content``/``layout`` views, for the OOD score)."""
        torch = self._torch
        with torch.inference_mode():
            logits = self.head(feats.float())
            probs = torch.softmax(logits / float(self.meta.temperature), dim=-1)
            scores = (self.ood.score(self.head[0](feats.float()), **(screen or {})).tolist()
                      if self.ood is not None else None)
        out = []
        for i, row in enumerate(probs.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            score = float(scores[i]) if scores is not None else None
            out.append(Route(self.meta.adapters[best], float(row[best]),
                             {n: float(p) for n, p in zip(self.meta.adapters, row)}, ood_score=score,
                             known=score is None or score <= self.ood.threshold))
        return out

    def embed(self, images: Sequence, prompts: Sequence[str]):
        """The router's input features for a batch (fp32 ``[B, H]`` on CPU), base model, adapters off."""
        if len(images) != len(prompts):
            raise InputError(located(None, "images", f"got {len(images)} images for {len(prompts)} prompts",
                                     fix="pass one image per prompt"))
        batch = self._prepare(list(zip(images, prompts)))
        with self._lock:
            return self._features(batch)[0]

    def route(self, image, prompt: str) -> Route:
        """Which adapter should act on (image, prompt). ``image``: a PIL image, a path, bytes or a numpy array."""
        return self.route_batch([(image, prompt)])[0]

    def route_batch(self, items: Sequence[tuple[Any, str]]) -> list[Route]:
        batch = self._prepare(items)
        with self._lock:
            return self._routes(*self._features(batch))

    # ---- acting -------------------------------------------------------------------------
    def _decide(self, route: Route, index: int | None = None) -> str:
        """The adapter that generates: the routed one, or ``router.fallback`` when the input is not known
        (unlike any adapter's data) or the confidence is below ``min_confidence``.

        NaN probabilities (features that overflowed) are an error, never a quiet fallback."""
        if not math.isfinite(route.confidence):
            item = f"item {index}: " if index is not None else ""
            raise InputError(located(None, "router", f"{item}the router's probabilities are not finite (NaN/inf): "
                                     "the routing features overflowed", fix="set router.dtype: float32 (or "
                                     "bfloat16) in registry.yaml; float16 overflows on large activations"))
        if route.known and route.confidence >= self.min_confidence:
            return route.adapter
        if self.fallback == "error":
            item = f"item {index}: " if index is not None else ""
            if not route.known:
                raise LowConfidenceError(located(
                    None, "router.fallback", f"{item}the input is unlike every adapter's training data (ood_score "
                    f"{route.ood_score:.3g} > threshold {self.ood.threshold:.3g}) and router.fallback is 'error'",
                    fix="set router.fallback to base or an adapter, add such screenshots to an adapter's dataset "
                        "and `router retrain`, or set router.ood: off"))
            raise LowConfidenceError(located(
                None, "router.fallback", f"{item}router confidence {route.confidence:.3f} for {route.adapter!r} is "
                f"below router.min_confidence={self.min_confidence} and router.fallback is 'error'",
                fix="lower router.min_confidence, set router.fallback to base or an adapter, or add training data "
                    "and `router retrain`"))
        return self.fallback  # "base" or an adapter name

    def _generation_kwargs(self, max_new_tokens: int, generate_kwargs: dict) -> dict:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(located(None, "max_new_tokens", f"max_new_tokens must be a positive integer, got "
                                     f"{max_new_tokens!r}", fix="pass e.g. max_new_tokens=64"))
        for k in ("adapter_names", "input_ids", "pixel_values", "attention_mask"):
            if k in generate_kwargs:
                raise InputError(located(None, k, "this generate argument is set by the engine", fix="drop it"))
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False}
        gc = self.base_model.generation_config
        if gc.pad_token_id is None:
            kw["pad_token_id"] = self.processor.tokenizer.pad_token_id
        kw.update(generate_kwargs)
        return kw

    def _generate(self, batch, adapters: Sequence[str], gen_kwargs: dict, opened: tuple[list, list]) -> list[str]:
        """One ``generate`` call for the batch; ``adapters[i]`` is an adapter name or ``"base"``. With vLLM the
        ``opened`` (images, prompts) go to the server instead, and the adapters need not be resident here."""
        if self._remote is not None:
            return self._remote.generate(*opened, adapters, gen_kwargs)
        torch = self._torch
        model = self.model
        uniq = set(adapters)
        self._pool.ensure(uniq)
        with torch.inference_mode():
            if uniq == {BASE}:
                with adapters_off(model):
                    out = model.generate(**batch, **gen_kwargs)
            elif len(uniq) == 1:
                activate(model, adapters[0])
                out = model.generate(**batch, **gen_kwargs)
            else:
                names = [PEFT_BASE if a == BASE else a for a in adapters]
                out = model.generate(**batch, adapter_names=names, **gen_kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        with self._prep_lock:
            return self.processor.batch_decode(new, skip_special_tokens=True)

    def _parse(self, adapter: str, text: str) -> UIAction | None:
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
        opened = self._open([(image, prompt)])
        batch = self._prepare(None, opened)
        with self._lock, reuse_image_features(self._inner) as reuse:
            if adapter is None:
                route = self._routes(*self._features(batch))[0]
                adapter = self._decide(route)
            else:
                route = self._forced_route(adapter)
            t1 = time.perf_counter()
            reuse["enabled"] = adapter not in self.vision_adapters
            text = self._generate(batch, [adapter], gen_kwargs, opened)[0]
            t2 = time.perf_counter()
        parsed = self._parse(adapter, text)
        t3 = time.perf_counter()
        timings = {"route_ms": (t1 - t0) * 1e3, "generate_ms": (t2 - t1) * 1e3, "total_ms": (t3 - t0) * 1e3,
                   "vision_calls": reuse["vision_calls"]}
        return Action(adapter, route.confidence, text, parsed, timings, routed=route.adapter, probs=route.probs,
                      ood_score=route.ood_score, known=route.known)

    def act_batch(self, items: Sequence[tuple[Any, str]], max_new_tokens: int = 64, *,
                  adapters: Sequence[str | None] | None = None, **generate_kwargs) -> list[Action]:
        """Route every (image, prompt), then generate them all in ONE call with mixed adapters.

        Rows are left padded; each row runs with its own adapter (peft's
        ``adapter_names``; ``"__base__"`` for a base fallback). Greedy results equal
        per-item :meth:`act`. One exception: when different adapters in the batch have
        weights inside the vision tower, peft cannot mix them there (the vision tower
        sees image patches, not batch rows, and peft refuses ``adapter_names``), so the
        batch is generated in one call per adapter; likewise in calls of at most
        ``engine.max_loaded_adapters`` adapters each when the rows name more. ``adapters`` (one entry per item:
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
        opened = self._open(items)
        batch = self._prepare(None, opened)
        with self._lock, reuse_image_features(self._inner) as reuse:
            routed = self._routes(*self._features(batch)) if None in forced else [None] * len(items)
            routes = [r if f is None else self._forced_route(f) for r, f in zip(routed, forced)]
            chosen = [self._decide(r, i) if f is None else r.adapter for i, (r, f) in enumerate(zip(routes, forced))]
            t1 = time.perf_counter()
            touches_vision = bool(set(chosen) & self.vision_adapters)
            groups = self._pool.groups(chosen) if self._pool is not None else [list(range(len(items)))]
            if touches_vision and len(set(chosen)) > 1:  # one call per adapter (see above)
                groups = [[i for i in idx if chosen[i] == a] for idx in groups
                          for a in dict.fromkeys(chosen[i] for i in idx)]
            reuse["enabled"] = not touches_vision and len(groups) == 1
            if len(groups) == 1:
                texts = self._generate(batch, chosen, gen_kwargs, opened)
            else:  # each group in a batch of its own (its rows' pixels prepared again)
                texts = [""] * len(items)
                for idx in groups:
                    sub = ([opened[0][i] for i in idx], [opened[1][i] for i in idx])
                    for i, t in zip(idx, self._generate(self._prepare(None, sub), [chosen[i] for i in idx],
                                                        gen_kwargs, sub)):
                        texts[i] = t
            t2 = time.perf_counter()
        parsed = [self._parse(a, t) for a, t in zip(chosen, texts)]
        t3 = time.perf_counter()
        timings = {"route_ms": (t1 - t0) * 1e3, "generate_ms": (t2 - t1) * 1e3, "total_ms": (t3 - t0) * 1e3,
                   "vision_calls": reuse["vision_calls"], "batch_size": len(items)}
        return [Action(a, r.confidence, t, p, dict(timings), routed=r.adapter, probs=r.probs, ood_score=r.ood_score,
                       known=r.known)
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
            raise UnknownAdapterError(located(None, "adapter", f"unknown adapter {name!r}",
                                              fix=f"one of {BASE}, {', '.join(self.meta.adapters)}"))
        return Route(name, 1.0, {})

    def _note_sources(self, reg: Registry, sources: Sequence[AdapterSource], version: str | Path | None = None) -> None:
        self.registry_path = reg.path
        self._router_version = str(version or os.path.realpath(reg.router_dir))

    def reload(self, registry: str | Path | Registry | None = None, *, check_base_model: bool = True) -> ReloadResult:
        """Switch to registry.yaml's live router without a restart (what ``router serve`` does on promotion).

        Reads registry.yaml (default: the one :meth:`from_registry` read), resolves the live
        router symlink once and reads that version whole; checks it matches the registry
        (:class:`StaleRouterError` otherwise -- e.g. between ``router add-adapter``'s
        promotion and its registry save: try again later) and the running base model; then
        :meth:`swap_router`. The registry's ``plugin:`` modules are registered, and its
        ``router.min_confidence`` / ``router.fallback`` / ``router.ood`` /
        ``router.max_prompt_tokens`` apply. On any error the engine keeps the router it had.
        """
        target = registry if registry is not None else self.registry_path
        if target is None:
            raise InputError(located(None, "registry", "this engine was not loaded from a registry, so it cannot "
                                     "reload one", fix="pass registry='registry.yaml'"))
        reg = target if isinstance(target, Registry) else Registry.load(target)
        m = reg.model
        router = read_router(reg.router_dir)  # one version: both files come from it
        check_router_for(router.meta, reg)
        running = getattr(self.base_model, "name_or_path", None)
        if running and reg.base_model != running and not _same_path(reg.base_model, running):
            raise ModelLoadError(located(reg.path, "base_model", f"base_model changed from {running!r} to "
                                         f"{reg.base_model!r}; a running engine cannot swap its base model",
                                         fix="restart (`router serve`) to load the new base model"))
        sources = [AdapterSource(a.name, reg.resolve(a.checkpoint), reg.path, f"adapters[{i}].checkpoint",
                                 reg.line_of(("adapters", i, "checkpoint")))
                   for i, a in enumerate(m.adapters)]
        stamps, known = (self._pool.stamps, self._pool.known) if self._pool is not None else ({}, None)
        for src in sources if known is not None else ():  # with vLLM the adapters live on the vLLM server
            if src.name not in known or stamps.get(src.name) != checkpoint_stamp(src.path):
                check_adapter_checkpoint(src, [m.base_model, reg.base_model] if check_base_model else [])
        for i, entry in enumerate(m.adapters):
            if entry.plugin:
                load_module_plugin(self.plugin_manager, entry.plugin, where=(reg.path, f"adapters[{i}].plugin"))
        result = self.swap_router(router.head, router.meta, sources, ood=router.ood if m.router.ood != "off" else None,
                                  min_confidence=m.router.min_confidence, fallback=m.router.fallback,
                                  version=router.dir)
        set_prompt_token_limit(self.processor, m.router.max_prompt_tokens)
        self.registry_path = reg.path
        return result

    def swap_router(self, head, meta: RouterMeta, sources: Sequence[AdapterSource], *, ood: OODModel | None = None,
                    min_confidence: float | None = None, fallback: str | None = None,
                    version: str | Path | None = None) -> ReloadResult:
        """Make (``head``, ``meta``, ``ood``) this engine's router, loading and dropping LoRAs to match.

        ``sources`` names the checkpoint of every adapter in ``meta.adapters``. Under the
        model lock (a call in flight finishes first; calls arriving meanwhile wait): load
        the adapters the model lacks into the running ``PeftModel`` (under
        ``engine.max_loaded_adapters`` they become known, loaded on first use), reload
        resident ones whose checkpoint files changed, check the new router against the
        model exactly as the constructor does, drop the adapters the new router no longer
        names, then switch head, representation, labels, OOD threshold and fallback at
        once. If a load or check fails, the pool is put back and the old router stays.
        With vLLM generation no LoRA is loaded here: only the router changes.
        """
        by_name = {s.name: s for s in sources}
        missing = [n for n in meta.adapters if n not in by_name]
        if missing:
            raise InputError(located(None, "sources", f"no checkpoint given for the router's adapters {missing}",
                                     fix="pass an AdapterSource for every name in router.json"))
        min_confidence = self.min_confidence if min_confidence is None else min_confidence
        fallback = self.fallback if fallback is None else fallback
        with self._lock:
            pool = self._pool
            snap = pool.snapshot() if pool is not None else None
            try:
                if pool is not None:
                    new, changed, dropped = pool.update([by_name[n] for n in meta.adapters])
                else:
                    new = [n for n in meta.adapters if n not in self.meta.adapters]
                    changed, dropped = [], [n for n in self.meta.adapters if n not in meta.adapters]
                checked = Engine(self.model, self.processor, head, meta, plugin_manager=self.plugin_manager,
                                 min_confidence=min_confidence, fallback=fallback, ood=ood, pool=pool,
                                 remote=self._remote)
            except BaseException:
                if pool is not None:
                    pool.restore(snap)
                raise
            if pool is not None:
                pool.drop(dropped)
            self.head, self.meta, self.ood = checked.head, checked.meta, checked.ood
            self.representation = checked.representation
            self.min_confidence, self.fallback = checked.min_confidence, checked.fallback
            self.vision_adapters = pool.vision_adapters() if pool is not None else frozenset()
            if version is not None:
                self._router_version = str(version)
        return ReloadResult(router=None if version is None else str(version), adapters=list(meta.adapters),
                            added=new, removed=dropped, replaced=changed)


def _same_path(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b)
