"""What ``router status`` reports: each adapter's files, and whether the live router is missing, ok or stale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlrouter.core.errors import CheckpointError, StaleRouterError
from vlrouter.core.registry import Registry
from vlrouter.core.store import META_FILE, check_router_for, read_meta, resolve_version


def count_lines(path: Path) -> int:
    """Non-blank lines of a file (the samples of a JSONL dataset)."""
    n = 0
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                n += 1
    return n


def is_peft_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def router_state(registry: Registry) -> dict[str, Any]:
    """The live router folder: ``state`` is missing / ok / stale / unreadable, with what router.json says."""
    d = registry.router_dir
    out: dict[str, Any] = {"dir": str(d)}
    if not (d / META_FILE).is_file():
        out["state"] = "missing"
        return out
    try:
        meta = read_meta(resolve_version(d))
    except CheckpointError as e:
        out.update(state="unreadable", reason=str(e))
        return out
    out.update(adapters=list(meta.adapters), created_at=meta.created_at, val_acc=meta.metrics.get("val_acc",
                                                                                                  meta.best_acc),
               base_model=meta.base_model, pooling=list(meta.pooling), layer=meta.layer, solver=meta.solver,
               representation=meta.representation().label, cv_acc=_chosen_cv(meta.selection),
               ood=(meta.ood or {}).get("threshold") is not None, temperature=meta.temperature,
               model_fingerprint=meta.model_fingerprint)
    try:
        check_router_for(meta, registry)
        out["state"] = "ok"
    except StaleRouterError as e:
        out.update(state="stale", reason=str(e))
    return out


def _chosen_cv(selection: dict[str, Any]) -> float | None:
    for c in selection.get("candidates", []):
        if c["views"] == selection.get("views") and c["layer"] == selection.get("layer"):
            return c["cv_acc"]
    return None


def registry_status(registry: Registry) -> dict[str, Any]:
    """Everything ``router status`` shows, as plain data (``--json`` prints it as is)."""
    adapters = []
    for i, a in enumerate(registry.adapters):
        ds, ck = registry.resolve(a.dataset), registry.resolve(a.checkpoint)
        ds_ok = ds.is_file()
        adapters.append({
            "label": i,
            "name": a.name,
            "plugin": a.plugin or "generic",
            "dataset": str(ds),
            "dataset_present": ds_ok,
            "dataset_lines": count_lines(ds) if ds_ok else None,
            "checkpoint": str(ck),
            "checkpoint_present": is_peft_dir(ck),
        })
    r = registry.model.router
    local = registry.base_model_is_local()
    return {"registry": str(registry.path), "base_model": registry.model.base_model,
            "base_model_resolved": registry.base_model, "base_model_local": local,
            "base_model_present": Path(registry.base_model).is_dir() if local else None,
            "min_confidence": r.min_confidence, "fallback": r.fallback, "max_prompt_tokens": r.max_prompt_tokens,
            "label_fingerprint": registry.label_fingerprint(), "adapters": adapters,
            "router": router_state(registry)}
