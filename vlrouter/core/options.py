"""Training options: built-in defaults < registry.yaml ``train:`` < CLI flags, resolved in one function."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import ValidationError, model_validator

from vlrouter.core.errors import InputError, located
from vlrouter.core.fit import resolve_solver
from vlrouter.core.registry import Registry, TrainSection, suggest


class TrainOptions(TrainSection):
    """``train:`` of registry.yaml with CLI overrides applied, plus what the encoder needs."""

    base_model: str
    base_model_revision: str | None = None
    pooling: str | list[str] = "auto"
    layer: Literal["auto"] | int = "auto"
    ood: str = "auto"
    dtype: str = "auto"
    solver_reason: str = ""
    max_prompt_tokens: int = 4096

    @property
    def pooling_views(self) -> list[str] | None:
        """The explicit views (``router.pooling``), or None for auto."""
        p = self.pooling
        return None if p == "auto" else ([p] if isinstance(p, str) else list(p))
    device: str | None = None
    gpu: str | None = None  # Modal GPU type for --backend modal (else registry.yaml modal.gpu)
    workers_note: str = ""  # how the worker count was chosen (``router embed`` prints it)

    @model_validator(mode="before")
    @classmethod
    def _auto_workers(cls, data: Any) -> Any:
        """``workers: auto`` (the default) becomes a count chosen from the machine (:func:`auto_workers`)."""
        if isinstance(data, dict) and data.get("workers", "auto") == "auto":
            count, why = auto_workers()
            data = {**data, "workers": count, "workers_note": why}
        return data


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def auto_workers(cpus: int | None = None) -> tuple[int, str]:
    """``train.workers: auto``: ``(count, why)``. 1 below 4 CPUs, else ``min(4, cpus - 1)``.

    Each worker process pays seconds of ``import torch, transformers`` and competes with
    the encoder's forward for the same cores: on 2 cores 2 workers embed *slower* than 1
    (README, Benchmarks), so a default never starts workers a small machine cannot feed.
    """
    n = cpu_count() if cpus is None else cpus
    if n < 4:
        return 1, f"auto: {n} CPU core{'s' if n != 1 else ''}; worker processes pay off from 4 cores"
    count = min(4, n - 1)
    return count, f"auto: {n} CPU cores, one left for the encoder's forward"


OVERRIDE_ALIASES = {"base_model_id": "base_model"}


def resolve_options(registry: Registry, overrides: dict[str, Any] | None = None) -> TrainOptions:
    """The one place options resolve: built-in defaults < ``registry.yaml`` ``train:`` < ``overrides``.

    ``overrides`` holds CLI flags by field name (``epochs``, ``batch_size``, ``lr``,
    ``patience``, ``train_samples``, ``eval_samples``, ``backend``, ``device``, …);
    ``None`` values mean "not given". ``base_model_id`` (the seed's flag) replaces the
    registry's ``base_model``; an existing local folder is made absolute.
    """
    m = registry.model
    values: dict[str, Any] = m.train.model_dump()
    values.update(base_model=registry.base_model, base_model_revision=m.base_model_revision,
                  pooling=m.router.pooling, layer=m.router.layer, ood=m.router.ood, dtype=m.router.dtype,
                  max_prompt_tokens=m.router.max_prompt_tokens)
    given = set(m.train.model_fields_set)
    known = set(TrainOptions.model_fields)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        field = OVERRIDE_ALIASES.get(key, key)
        if field not in known:
            raise InputError(located(None, key, f"unknown training option{suggest(key, sorted(known))}",
                                     fix=f"one of {', '.join(sorted(known))}"))
        if field == "base_model" and os.path.exists(os.path.expanduser(str(value))):
            value = os.path.abspath(os.path.expanduser(str(value)))
        values[field] = value
        given.add(field)
    values["solver"], values["solver_reason"] = resolve_solver(values.get("head", "linear"),
                                                                values.get("solver", "auto"), given)
    if values.get("workers") != "auto":
        values["workers_note"] = "set by --workers" if (overrides or {}).get("workers") is not None \
            else "set by train.workers"
    try:
        return TrainOptions.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(x) for x in err["loc"])
        flag = "--" + name.replace("_", "-")
        raise InputError(located(None, name, f"{err['msg']} (got {values.get(name)!r})",
                                 fix=f"correct {flag} or train.{name} in registry.yaml")) from None
