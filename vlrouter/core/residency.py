"""The adapter pool: at most N LoRAs resident in one PeftModel, loaded on first use, least recently used evicted.

``engine.max_loaded_adapters: N`` in registry.yaml bounds the engine's memory as adapters
grow into the hundreds: every adapter stays *known* (its checkpoint folder, checked when
the engine loads), but only N have weights in the model. :meth:`AdapterPool.ensure` makes
a call's adapters resident before it generates -- loading the missing ones from their
``adapter_model.safetensors`` (never a pickle) after evicting the least recently used --
and :meth:`AdapterPool.groups` splits a batch whose rows name more than N adapters into
groups that each fit. The model never holds more than N LoRAs: eviction comes before the
load. Without a cap (the default) every adapter is loaded once and nothing is evicted.

The pool is not thread-safe on its own: the engine calls it under its model lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

from vlrouter.core.errors import InputError, RouterError, UnknownAdapterError, located
from vlrouter.core.lora import (
    AdapterSource,
    adapters_in,
    check_weights_file,
    checkpoint_stamp,
    delete_adapter,
    load_adapter,
    load_adapters,
    touches_vision,
)
from vlrouter.core.results import BASE
from vlrouter.core.views import inner_vl_model


class AdapterPool:
    """The adapters an engine knows (name -> checkpoint) and which of them the PeftModel holds, in LRU order."""

    def __init__(self, model, sources: Sequence[AdapterSource] = (), capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise InputError(located(None, "max_loaded_adapters", f"must be >= 1, got {capacity}",
                                     fix="keep at least one adapter loaded, or pass None for all"))
        self.model = model
        self.capacity = capacity
        self.sources: dict[str, AdapterSource] = {s.name: s for s in sources}
        self.stamps: dict[str, tuple] = {s.name: checkpoint_stamp(s.path) for s in sources}
        self._lru: OrderedDict[str, None] = OrderedDict((n, None) for n in model.peft_config)
        self._order: tuple[str, ...] = tuple(self._lru)  # a snapshot other threads may read (GET /readyz)
        self._vision: dict[str, bool] = {n: True for n in adapters_in(inner_vl_model(model).visual)}
        self.loads = 0  # adapters loaded on demand (not counting the initial ones)
        self.evictions = 0
        self.peak = len(self._lru)  # the most adapters ever resident at once

    @classmethod
    def load(cls, base, sources: Sequence[AdapterSource], capacity: int | None = None) -> AdapterPool:
        """Wrap ``base`` in a PeftModel with the first ``capacity`` adapters (all without a cap); the rest are
        known and load on first use."""
        first = list(sources) if capacity is None else list(sources)[:capacity]
        return cls(load_adapters(base, first), sources, capacity)

    # ---- what is where ---------------------------------------------------------------------
    @property
    def limit(self) -> int:
        """How many adapters may be resident at once."""
        return self.capacity if self.capacity is not None else max(len(self.known), 1)

    @property
    def known(self) -> set[str]:
        return set(self.sources) | set(self._lru)

    @property
    def resident(self) -> list[str]:
        """Resident adapters, least recently used first (a snapshot: safe to read from any thread)."""
        return list(self._order)

    def vision_adapters(self) -> frozenset[str]:
        """Adapters with LoRA weights inside the vision tower, resident or not (from the checkpoint's key names)."""
        for name, src in self.sources.items():
            if name not in self._vision:
                self._vision[name] = touches_vision(src)
        return frozenset(n for n, v in self._vision.items() if v and n in self.known)

    # ---- making a call's adapters resident ----------------------------------------------------
    def ensure(self, names: Iterable[str]) -> None:
        """Make every adapter in ``names`` resident (``"base"`` needs none), evicting the least recently used."""
        wanted = list(dict.fromkeys(n for n in names if n != BASE))
        unknown = [n for n in wanted if n not in self.known]
        if unknown:
            raise UnknownAdapterError(located(None, "adapter", f"unknown adapter {unknown[0]!r}",
                                              fix=f"one of {BASE}, {', '.join(sorted(self.known))}"))
        if len(wanted) > self.limit:
            raise InputError(located(None, "adapters", f"{len(wanted)} adapters in one generate call, but at most "
                                     f"{self.limit} may be loaded at once (engine.max_loaded_adapters)",
                                     fix="split the batch with AdapterPool.groups()"))
        for name in wanted:
            if name in self._lru:
                self._lru.move_to_end(name)
        self._order = tuple(self._lru)
        for name in wanted:
            if name in self._lru:
                continue
            while len(self._lru) >= self.limit:
                self._evict(next(n for n in self._lru if n not in wanted))
            self._load(self.sources[name])
            self.loads += 1

    def groups(self, chosen: Sequence[str]) -> list[list[int]]:
        """Row indices split so that each group names at most :attr:`limit` adapters (one group when they fit).

        Resident adapters go into the first group (no loads for it); base rows ride with the first group.
        """
        order = list(dict.fromkeys(a for a in chosen if a != BASE))
        if len(order) <= self.limit:
            return [list(range(len(chosen)))]
        order.sort(key=lambda n: n not in self._lru)  # stable: resident first, then first appearance
        chunks = [set(order[i:i + self.limit]) for i in range(0, len(order), self.limit)]
        return [[i for i, a in enumerate(chosen) if a in chunk or (k == 0 and a == BASE)]
                for k, chunk in enumerate(chunks)]

    # ---- a new router's adapter set (Engine.swap_router) -----------------------------------
    def update(self, sources: Sequence[AdapterSource]) -> tuple[list[str], list[str], list[str]]:
        """Take ``sources`` as the known adapters: ``(added, replaced, removed)`` names.

        Without a cap, new adapters are loaded now (as ever); with one they are known but not
        resident until first used. A resident adapter whose checkpoint files changed is
        reloaded; a non-resident one just points at its new files. Removed adapters stay
        until :meth:`drop`. On any error, :meth:`restore` with the returned snapshot undoes it.
        """
        by_name = {s.name: s for s in sources}
        added = [s for s in sources if s.name not in self.known]
        replaced = [s for s in sources if s.name in self.known and s.name in self.stamps
                    and self.stamps[s.name] != checkpoint_stamp(s.path)]
        removed = [n for n in self.known if n not in by_name]
        for src in replaced:
            self._vision.pop(src.name, None)
            if src.name in self._lru:
                self._evict(src.name, count=False)
                self._load(src)
        for src in added:
            if self.capacity is None:
                self._load(src)
        self.sources.update(by_name)
        for src in [*added, *replaced]:
            self.stamps[src.name] = checkpoint_stamp(src.path)
        return [s.name for s in added], [s.name for s in replaced], removed

    def snapshot(self) -> tuple:
        return dict(self.sources), dict(self.stamps), list(self._lru)

    def restore(self, snap: tuple) -> None:
        """Back to a :meth:`snapshot`: drop adapters loaded since, reload replaced ones from their old files
        (best effort: those files may be gone)."""
        sources, stamps, resident = snap
        for name in list(self._lru):
            if name not in resident or self.stamps.get(name) != stamps.get(name):
                self._evict(name, count=False)
        for name in resident:
            if name not in self._lru and name in stamps:
                try:
                    self._load(AdapterSource(name, Path(stamps[name][0])))
                except RouterError:
                    pass
        self.sources, self.stamps = sources, stamps

    def drop(self, names: Iterable[str]) -> None:
        """Forget adapters the router no longer names (their weights leave the model)."""
        for name in names:
            if name in self._lru:
                self._evict(name, count=False)
            self.sources.pop(name, None)
            self.stamps.pop(name, None)
            self._vision.pop(name, None)

    # ---- one adapter in or out --------------------------------------------------------------
    def _load(self, src: AdapterSource) -> None:
        check_weights_file(src)  # whole safetensors, never a pickle: checked again, the files may have changed
        try:
            load_adapter(self.model, src)
        except BaseException:
            if src.name in self.model.peft_config:  # peft registers the adapter before its weights fail to load
                delete_adapter(self.model, src.name)
            raise
        self._lru[src.name] = None
        self._order = tuple(self._lru)
        self._vision[src.name] = src.name in adapters_in(inner_vl_model(self.model).visual)
        self.peak = max(self.peak, len(self._lru))
        self.model.eval()
        self.model.requires_grad_(False)

    def _evict(self, name: str, *, count: bool = True) -> None:
        delete_adapter(self.model, name)
        del self._lru[name]
        self._order = tuple(self._lru)
        if count:
            self.evictions += 1
