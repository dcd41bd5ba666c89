"""The router head and its checkpoint: ``head.safetensors`` + ``router.json``. Never a pickle.

Layout of a live router at ``router.dir`` (say ``runs/router``)::

    runs/router            -> symlink to .router.versions/20261121-101500-ab12cd
    runs/.router.versions/ one folder per promoted router (the newest few are kept)

Promotion writes the new router into a fresh version folder, then swaps the symlink
with ``os.replace`` (atomic on POSIX): a reader sees the old router or the new one,
and a crash at any point leaves the old one live. ``router.json`` carries everything
needed to rebuild the head (nanoGPT-style ``model_args``) and to detect staleness.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vlrouter.core.errors import CheckpointError, StaleRouterError, located

FORMAT_VERSION = 1
HEAD_FILE = "head.safetensors"
META_FILE = "router.json"
KEEP_VERSIONS = 3


class HeadShape(BaseModel):
    model_config = ConfigDict(extra="ignore")
    kind: Literal["linear", "mlp"] = "linear"
    in_dim: int
    hidden: int = 0
    num_labels: int


class RouterMeta(BaseModel):
    """router.json. Lenient on read (unknown keys warn, for forward compatibility)."""

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    adapters: list[str]
    base_model: str
    pooling: str
    layer: int
    hidden_size: int
    head: HeadShape
    temperature: float = 1.0
    best_loss: float | None = None
    best_acc: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    registry_fingerprint: str | None = None
    label_fingerprint: str | None = None
    dataset_fingerprint: str | None = None
    encoder_fingerprint: str | None = None
    embedded_new: int = 0
    reused_cached: int = 0
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    vlrouter_version: str = ""


def _standardize_cls():
    from torch import nn

    class Standardize(nn.Module):
        """Per-feature ``(x - mean) / std`` with statistics fitted on the training features.

        LLM hidden states have a few dimensions with huge activations; a per-sample
        LayerNorm lets those dominate, per-feature standardization does not. The
        statistics are buffers, so they travel in head.safetensors.
        """

        def __init__(self, dim: int) -> None:
            super().__init__()
            import torch

            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("std", torch.ones(dim))

        def fit(self, feats) -> None:
            self.mean.copy_(feats.mean(0))
            self.std.copy_(feats.std(0).clamp_min(1e-6) if feats.shape[0] > 1 else self.std)

        def forward(self, x):
            return (x - self.mean) / self.std

    return Standardize


def build_head(shape: HeadShape):
    """Standardize -> Linear, or a small MLP (Standardize -> Linear -> GELU -> Dropout -> Linear).

    Call ``head[0].fit(train_features)`` before training.
    """
    from torch import nn

    std = _standardize_cls()(shape.in_dim)
    if shape.kind == "linear":
        return nn.Sequential(std, nn.Linear(shape.in_dim, shape.num_labels))
    return nn.Sequential(
        std,
        nn.Linear(shape.in_dim, shape.hidden),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(shape.hidden, shape.num_labels),
    )


def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        return "a torch.save zip archive (pickle inside)"
    if head[:1] == b"\x80":
        return "a Python pickle"
    return "not a safetensors file"


def save_router(out_dir: str | Path, head, meta: RouterMeta) -> Path:
    """Write ``head.safetensors`` + ``router.json`` into ``out_dir`` (a fresh folder)."""
    from safetensors.torch import save_file

    from vlrouter import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = meta.model_copy(update={"vlrouter_version": meta.vlrouter_version or __version__})
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(out / HEAD_FILE), metadata={"format": "pt", "vlrouter_format_version": str(FORMAT_VERSION)})
    (out / META_FILE).write_text(json.dumps(meta.model_dump(mode="json"), indent=2) + "\n")
    for f in (out / HEAD_FILE, out / META_FILE):
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    return out


def read_meta(router_dir: str | Path) -> RouterMeta:
    d = Path(router_dir)
    mp = d / META_FILE
    if not mp.is_file():
        raise CheckpointError(located(mp, None, "router.json not found",
                                      fix="train a router with `router retrain` (or `router train`)"))
    try:
        data = json.loads(mp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(located(mp, getattr(e, "lineno", None), f"not valid JSON: {e}",
                                      fix="retrain with `router retrain`")) from None
    if not isinstance(data, dict):
        raise CheckpointError(located(mp, None, "top level is not an object", fix="retrain with `router retrain`"))
    try:
        meta = RouterMeta.model_validate(data)
    except Exception as e:
        raise CheckpointError(located(mp, None, f"invalid router.json: {e.errors()[0]['loc'] if hasattr(e, 'errors') else e}"
                                      f" {e.errors()[0]['msg'] if hasattr(e, 'errors') else ''}".rstrip(),
                                      fix="retrain with `router retrain`")) from None
    if meta.format_version > FORMAT_VERSION:
        raise CheckpointError(located(mp, "format_version", f"format {meta.format_version} is newer than this "
                                      f"vlrouter understands ({FORMAT_VERSION})", fix="upgrade vlrouter"))
    extra = set(data) - set(RouterMeta.model_fields)
    if extra:
        warnings.warn(f"{mp}: ignoring unknown keys {sorted(extra)} (written by a newer vlrouter?)", stacklevel=2)
    if len(meta.adapters) != meta.head.num_labels:
        raise CheckpointError(located(mp, "adapters", f"{len(meta.adapters)} adapter names for a head with "
                                      f"{meta.head.num_labels} outputs", fix="retrain with `router retrain`"))
    return meta


def load_router(router_dir: str | Path):
    """Return ``(head, meta)``; the head is an eval-mode fp32 module on CPU. Never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(router_dir)
    meta = read_meta(d)
    hp = d / HEAD_FILE
    if not hp.is_file():
        raise CheckpointError(located(hp, None, "head.safetensors not found", fix="retrain with `router retrain`"))
    try:
        state = load_file(str(hp))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(located(hp, None, f"{_sniff(hp)}; refusing to load it ({e}). vlrouter loads router "
                                      "weights only from safetensors, never from pickles",
                                      fix="retrain with `router retrain`, or import a seed checkpoint with "
                                          "`router import-seed-head`")) from None
    head = build_head(meta.head)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(located(hp, None, f"weights do not match router.json's head shape: "
                                      f"{str(e).splitlines()[0]}", fix="retrain with `router retrain`")) from None
    head.eval()
    return head, meta


def check_compatible(meta: RouterMeta, *, adapters: list[str], base_model: str | None = None,
                     pooling: str | None = None, layer: int | None = None, where: str | Path = "router.json") -> None:
    """Raise :class:`StaleRouterError` when the router was trained for something else."""
    fix = "run `router retrain`"
    if list(meta.adapters) != list(adapters):
        if set(meta.adapters) == set(adapters):
            what = f"the adapter order differs (router: {meta.adapters}, registry: {adapters})"
        else:
            what = f"the adapter set differs (router: {meta.adapters}, registry: {adapters})"
        raise StaleRouterError(located(where, "adapters", f"stale router: {what}", fix=fix))
    if base_model is not None and meta.base_model != base_model:
        raise StaleRouterError(located(where, "base_model", f"stale router: trained on {meta.base_model!r}, "
                                       f"registry uses {base_model!r}", fix=fix))
    if pooling is not None and meta.pooling != pooling:
        raise StaleRouterError(located(where, "pooling", f"stale router: pooling {meta.pooling!r}, registry "
                                       f"says {pooling!r}", fix=fix))
    if layer is not None and meta.layer != layer:
        raise StaleRouterError(located(where, "layer", f"stale router: layer {meta.layer}, registry says {layer}",
                                       fix=fix))


# ---- promotion: the live router is a symlink swapped atomically -------------------------

def versions_dir(live: Path) -> Path:
    return live.parent / f".{live.name}.versions"


def new_version_dir(live: str | Path) -> Path:
    """A fresh, empty folder beside the live router to write a candidate into."""
    live = Path(live)
    vd = versions_dir(live)
    vd.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = vd / f"{stamp}-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    return d


def promote(candidate: str | Path, live: str | Path) -> Path:
    """Make ``candidate`` (a complete router folder) the live router, atomically.

    ``candidate`` is moved into the versions folder if it is elsewhere. A live router
    that is a plain folder (older layout, or copied in by hand) is first moved into the
    versions folder too.
    """
    live = Path(live)
    cand = Path(candidate)
    read_meta(cand)  # refuse to promote something that does not load
    if not (cand / HEAD_FILE).is_file():
        raise CheckpointError(located(cand / HEAD_FILE, None, "missing", fix="the candidate router is incomplete"))
    vd = versions_dir(live)
    vd.mkdir(parents=True, exist_ok=True)
    if cand.resolve().parent != vd.resolve():
        target = new_version_dir(live)
        target.rmdir()
        shutil.copytree(cand, target)
        cand = target
    if live.exists() and not live.is_symlink():
        legacy = new_version_dir(live)
        legacy.rmdir()
        os.replace(live, legacy)
        os.symlink(os.path.relpath(legacy, live.parent), live)
    tmp_link = live.parent / f".{live.name}.link-{uuid.uuid4().hex[:6]}"
    os.symlink(os.path.relpath(cand, live.parent), tmp_link)
    os.replace(tmp_link, live)
    _prune(live)
    return live


def _prune(live: Path) -> None:
    vd = versions_dir(live)
    current = live.resolve() if live.exists() else None
    versions = sorted((p for p in vd.iterdir() if p.is_dir()), key=lambda p: p.name)
    for old in versions[:-KEEP_VERSIONS]:
        if current is not None and old.resolve() == current:
            continue
        shutil.rmtree(old, ignore_errors=True)
