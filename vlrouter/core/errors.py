"""Typed errors. Library code raises these; only the CLI (``cli/``) prints them and exits.

Every message should name *where* (file, line or field) and *what to do*. Build them
with :func:`located` so the shape stays the same everywhere:

    raise RegistryError(located("registry.yaml", "adapters[2].name", "must match [a-z0-9][a-z0-9-]*",
                                fix="rename it, e.g. 'claim-window'"))
"""

from __future__ import annotations

from pathlib import Path


def located(
    file: str | Path | None,
    where: str | int | None,
    problem: str,
    *,
    fix: str | None = None,
    line: int | None = None,
) -> str:
    """Format ``file:LINE: field: problem (fix: ...)`` in one line.

    ``where`` is a line number (int) or a field path (str) such as ``adapters[1].dataset``;
    pass ``line=`` as well when both are known.
    """
    if isinstance(where, int) and line is None:
        line, where = where, None
    parts = []
    if file is not None:
        parts.append(f"{file}:{line}" if line is not None else str(file))
    elif line is not None:
        parts.append(f"line {line}")
    if where:
        parts.append(str(where))
    msg = ": ".join(parts + [problem])
    if fix:
        msg += f" (fix: {fix})"
    return msg


class RouterError(Exception):
    """Base of every error vlrouter raises on purpose. The CLI prints ``str(err)`` and exits 1."""

    exit_code = 1


class RegistryError(RouterError):
    """registry.yaml is unreadable, invalid, or an edit to it was refused."""


class PluginError(RouterError):
    """A plugin could not be imported, or plugins disagree (e.g. two declare one adapter name)."""


class DatasetError(RouterError):
    """An adapter dataset (JSONL) or the routing dataset is malformed or unusable."""


class ImageError(DatasetError):
    """An image is missing, corrupt, or refused (decompression bomb, absurd size)."""


class ModelLoadError(RouterError):
    """The base model, processor or a LoRA adapter could not be loaded or does not fit."""


class CheckpointError(RouterError):
    """A router checkpoint is missing, unreadable, unsafe (pickle) or inconsistent."""


class StaleRouterError(CheckpointError):
    """The router on disk was trained for another label set, base model, pooling or layer."""


class TrainingError(RouterError):
    """Head training could not run or produced nothing usable."""


class PromotionRefused(TrainingError):
    """The eval gate kept the live router: the new one scored lower on the same validation samples."""


class LockHeldError(RouterError):
    """Another retrain holds the lock on this registry's router."""


class BackendError(RouterError):
    """A training backend failed (unknown backend, Modal credentials, connectivity)."""


class StorageError(RouterError):
    """A file or folder could not be written: disk full, read-only, permission denied, a file where a folder goes."""


class InputError(RouterError):
    """A bad argument from a caller: empty prompt, unknown adapter name, bad option value."""


class LowConfidenceError(RouterError):
    """The router's confidence was below ``router.min_confidence`` and ``router.fallback`` is ``error``."""


class UnknownAdapterError(InputError):
    """A caller named an adapter the router does not have (e.g. a forced ``adapter=`` or a server ``model``)."""


class GenerationServerError(RouterError):
    """The generation server (``engine.generation: vllm``) is down, refused a request, or does not serve an adapter."""


class GenerationTimeout(GenerationServerError):
    """The generation server did not answer within ``engine.vllm_timeout``."""
