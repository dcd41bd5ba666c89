"""The router store: router.json + head.safetensors on disk, compatibility, the eval gate, promotion, the lock.

Layout of a live router at ``router.dir`` (say ``runs/router``)::

    runs/router            -> symlink to .router.versions/20261121-101500-ab12cd
    runs/.router.versions/ one folder per router version (the newest few are kept)

A candidate is written into a fresh version folder; promotion swaps the symlink with
``os.replace`` (atomic on POSIX): a reader sees the old router or the new one, and a
crash at any point leaves the old one live. A reader resolves the symlink once and
reads both files from that one version. ``router.json`` carries everything needed to
rebuild the head (nanoGPT-style ``model_args``) and to detect staleness. Never a pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlrouter import __version__
from vlrouter.core.atomic import atomic_write_bytes
from vlrouter.core.encoder import Representation
from vlrouter.core.errors import CheckpointError, LockHeldError, PromotionRefused, StaleRouterError, located
from vlrouter.core.fit import as_labels
from vlrouter.core.head import HeadShape, build_head, head_logits
from vlrouter.core.ood import OODModel

if TYPE_CHECKING:
    from vlrouter.core.registry import Registry

FORMAT_VERSION = 2  # 2: pooling is a list of views, layer a hidden-state index, optional OOD statistics
HEAD_FILE = "head.safetensors"
META_FILE = "router.json"
KEEP_VERSIONS = 3


class RouterMeta(BaseModel):
    """router.json. Lenient on read (unknown keys warn, for forward compatibility)."""

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    adapters: list[str]
    base_model: str
    pooling: list[str]  # the views the head reads, concatenated in this order
    layer: int  # hidden-state index they are pooled at (format 1 routers: may be negative, -1 = last)
    num_layers: int | None = None  # the base model's decoder layers (None in format 1)
    hidden_size: int
    head: HeadShape
    temperature: float = 1.0
    solver: str | None = None
    l2: float | None = None
    selection: dict[str, Any] = Field(default_factory=dict)  # every candidate's CV score, the chosen one
    ood: dict[str, Any] | None = None  # OOD threshold and settings; its tensors are in head.safetensors
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


    @field_validator("pooling", mode="before")
    @classmethod
    def _one_view_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # format 1 wrote one view as a string

    def representation(self) -> Representation:
        """The views and (resolved) layer the head reads."""
        layer = self.layer
        if layer < 0 and self.num_layers is not None:
            layer = self.num_layers + 1 + layer
        return Representation(tuple(self.pooling), layer)


def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        return "a torch.save zip archive (pickle inside)"
    if head[:1] == b"\x80":
        return "a Python pickle"
    return "not a safetensors file"


# ---- writing and reading one router folder --------------------------------------------------

def save_router(out_dir: str | Path, head, meta: RouterMeta, ood: OODModel | None = None) -> Path:
    """Write ``head.safetensors`` (+ the OOD statistics' tensors) + ``router.json`` into ``out_dir``, fsynced."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    update: dict[str, Any] = {"vlrouter_version": meta.vlrouter_version or __version__}
    if ood is not None:
        update["ood"] = ood.meta()
    meta = meta.model_copy(update=update)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    if ood is not None:
        tensors.update({k: v.detach().float().cpu().contiguous() for k, v in ood.tensors().items()})
    save_file(tensors, str(out / HEAD_FILE), metadata={"format": "pt", "vlrouter_format_version": str(FORMAT_VERSION)})
    (out / META_FILE).write_text(json.dumps(meta.model_dump(mode="json"), indent=2) + "\n")
    for f in (out / HEAD_FILE, out / META_FILE):
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    return out


def resolve_version(router_dir: str | Path) -> Path:
    """The version folder a (symlinked) router folder points at now: resolve once, then read from it."""
    return Path(os.path.realpath(router_dir))


def read_meta(router_dir: str | Path) -> RouterMeta:
    """router.json of ``router_dir``, validated; :class:`CheckpointError` naming the file otherwise."""
    mp = Path(router_dir) / META_FILE
    fix = "retrain with `router retrain`"
    if not mp.is_file():
        raise CheckpointError(located(mp, None, "router.json not found",
                                      fix="train a router with `router retrain` (or `router train`)"))
    try:
        data = json.loads(mp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(located(mp, getattr(e, "lineno", None), f"not valid JSON: {e}", fix=fix)) from None
    if not isinstance(data, dict):
        raise CheckpointError(located(mp, None, "top level is not an object", fix=fix))
    try:
        meta = RouterMeta.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or None
        raise CheckpointError(located(mp, where, f"invalid router.json: {err['msg']}", fix=fix)) from None
    if meta.format_version > FORMAT_VERSION:
        raise CheckpointError(located(mp, "format_version", f"format {meta.format_version} is newer than this "
                                      f"vlrouter understands ({FORMAT_VERSION})", fix="upgrade vlrouter"))
    extra = set(data) - set(RouterMeta.model_fields)
    if extra:
        warnings.warn(f"{mp}: ignoring unknown keys {sorted(extra)} (written by a newer vlrouter?)", stacklevel=2)
    if len(meta.adapters) != meta.head.num_labels:
        raise CheckpointError(located(mp, "adapters", f"{len(meta.adapters)} adapter names for a head with "
                                      f"{meta.head.num_labels} outputs", fix=fix))
    return meta


@dataclass
class Router:
    """One router version, read whole: the head, router.json, and the OOD statistics when it has them."""

    head: Any
    meta: RouterMeta
    ood: OODModel | None
    dir: Path  # the version folder it was read from


def load_router(router_dir: str | Path):
    """Return ``(head, meta)`` of one router version (see :func:`read_router`)."""
    r = read_router(router_dir)
    return r.head, r.meta


def read_router(router_dir: str | Path) -> Router:
    """One router version; the head is an eval-mode fp32 module on CPU.

    The symlink is resolved once, so router.json and head.safetensors come from the same
    version even while another process promotes. Never unpickles.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = resolve_version(router_dir)
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
    extra = {k: v for k, v in state.items() if k.startswith("ood.")}
    head = build_head(meta.head)
    try:
        head.load_state_dict({k: v for k, v in state.items() if k not in extra}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(located(hp, None, f"weights do not match router.json's head shape: "
                                      f"{str(e).splitlines()[0]}", fix="retrain with `router retrain`")) from None
    head.eval()
    ood = OODModel.from_saved(extra, meta.ood, where=d / META_FILE) if meta.ood is not None else None
    return Router(head=head, meta=meta, ood=ood, dir=d)


# ---- compatibility ---------------------------------------------------------------------------

def same_base_model(recorded: str, registry: Registry) -> bool:
    """router.json's ``base_model`` names the registry's base model: as written in registry.yaml,
    or -- for a local folder -- resolved against the registry's folder (relative or absolute)."""
    if recorded in (registry.model.base_model, registry.base_model):
        return True
    local = registry.resolve(registry.model.base_model)
    rec = Path(recorded).expanduser()
    if not rec.is_absolute():
        rec = registry.resolve(recorded)
    return local.exists() and rec.exists() and os.path.realpath(rec) == os.path.realpath(local)


def check_compatible(meta: RouterMeta, *, adapters: list[str], base_model: str | None = None,
                     pooling: list[str] | None = None, layer: int | None = None,
                     where: str | Path = META_FILE) -> None:
    """Raise :class:`StaleRouterError` when the router was trained for something else.

    ``pooling`` / ``layer`` are the registry's explicit settings (None for auto: any choice fits).
    """
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
    if pooling is not None and list(meta.pooling) != list(pooling):
        raise StaleRouterError(located(where, "pooling", f"stale router: pooling {meta.pooling}, registry "
                                       f"says {list(pooling)}", fix=fix))
    if layer is not None:
        n = meta.num_layers
        want = n + 1 + layer if (layer < 0 and n is not None) else layer
        have = n + 1 + meta.layer if (meta.layer < 0 and n is not None) else meta.layer
        if want != have:
            raise StaleRouterError(located(where, "layer", f"stale router: layer {meta.layer}, registry says "
                                           f"{layer}", fix=fix))


def check_router_for(meta: RouterMeta, registry: Registry) -> None:
    """:func:`check_compatible` against ``registry`` (its adapters, base model, pooling and layer)."""
    m = registry.model
    layer = m.router.layer
    check_compatible(meta, adapters=registry.adapter_names,
                     base_model=None if same_base_model(meta.base_model, registry) else m.base_model,
                     pooling=m.router.views, layer=None if layer == "auto" else int(layer),
                     where=registry.router_dir / META_FILE)


# ---- versions and promotion --------------------------------------------------------------

def versions_dir(live: str | Path) -> Path:
    live = Path(live)
    return live.parent / f".{live.name}.versions"


def new_version_dir(live: str | Path) -> Path:
    """A fresh, empty folder beside the live router to write a candidate into."""
    vd = versions_dir(live)
    vd.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = vd / f"{stamp}-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    return d


def promote(candidate: str | Path, live: str | Path) -> Path:
    """Make ``candidate`` (a complete router folder) the live router, atomically.

    ``candidate`` is copied into the versions folder if it is elsewhere. A live router
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


# ---- the eval gate -------------------------------------------------------------------------

@dataclass
class GateDecision:
    promoted: bool
    message: str
    val_acc: float | None
    live_val_acc: float | None
    n_val: int | None


def live_accuracy(live_dir: str | Path, candidate: RouterMeta, val_views, val_labels) -> tuple[float | None, str]:
    """The live router's accuracy on the candidate's validation samples, read from ONE live version.

    ``val_views`` holds every view embedded for those samples (``{"view@layer": [N, H]}``),
    so a live router that reads another representation is scored on its own features.
    ``(None, why)`` when there is no live router, it does not load, or it is not comparable
    (other labels, features from another encoder, or views this run did not embed).
    """
    live = Path(live_dir)
    if not (live / META_FILE).is_file():
        return None, "no live router"
    try:
        head, meta = load_router(live)
    except CheckpointError:
        return None, "the live router does not load"
    if list(meta.adapters) != list(candidate.adapters):
        return None, f"the live router has other labels ({', '.join(meta.adapters)})"
    if meta.encoder_fingerprint != candidate.encoder_fingerprint:
        return None, "the live router used another encoder"
    if val_views is None or val_labels is None:
        return None, "no validation features to compare on"
    rep = meta.model_copy(update={"num_layers": meta.num_layers or candidate.num_layers}).representation()
    if any(k not in val_views for k in rep.keys):
        return None, f"the live router reads {rep.label}, which this run did not embed"
    try:
        feats = rep.features(val_views)
        acc = float((head_logits(head, feats).argmax(1) == as_labels(val_labels)).float().mean())
    except RuntimeError:
        return None, "the live router does not fit these features"
    return acc, ""


def promote_with_gate(candidate_dir: str | Path, live_dir: str | Path, *, val_views=None, val_labels=None,
                      force: bool = False) -> GateDecision:
    """Promote the candidate unless it scored below the live router on the same validation samples.

    The live router is read once (:func:`live_accuracy`). Below it and not ``force``:
    :class:`PromotionRefused` with both numbers; the live router is left untouched and the
    candidate stays in its version folder.
    """
    cand, live = Path(candidate_dir), Path(live_dir)
    meta = read_meta(cand)
    val_acc = meta.metrics.get("val_acc")
    n_val = meta.metrics.get("n_val")
    live_acc, note = live_accuracy(live, meta, val_views, val_labels)

    def fmt(a: float | None) -> str:
        return f"{a:.3f}" if isinstance(a, (int, float)) else "n/a"

    same = f"on the same {n_val} validation samples"
    if live_acc is not None and val_acc is not None and val_acc < live_acc:
        if not force:
            err = PromotionRefused(located(cand, None, f"new router {fmt(val_acc)} < live {fmt(live_acc)} {same}; "
                                           "kept the live router, the candidate stays here",
                                           fix="--force to promote anyway"))
            err.candidate_dir, err.val_acc, err.live_val_acc = str(cand), val_acc, live_acc
            raise err
        msg = f"promoted by --force: new {fmt(val_acc)} < live {fmt(live_acc)} {same}"
    elif live_acc is not None:
        msg = f"promoted: new {fmt(val_acc)} >= live {fmt(live_acc)} {same}"
    else:
        msg = f"promoted: val acc {fmt(val_acc)} ({note})"
    _record_gate(cand, meta, live_acc, msg)
    promote(cand, live)
    return GateDecision(True, msg, val_acc, live_acc, n_val)


def _record_gate(cand: Path, meta: RouterMeta, live_acc: float | None, message: str) -> None:
    """Write the gate's decision into the candidate's router.json (atomically, before it goes live)."""
    metrics = {**meta.metrics, "gate": message}
    if live_acc is not None:
        metrics["live_val_acc"] = live_acc
    data = meta.model_copy(update={"metrics": metrics}).model_dump(mode="json")
    atomic_write_bytes(cand / META_FILE, (json.dumps(data, indent=2) + "\n").encode())


# ---- one retrain at a time -------------------------------------------------------------------

def lock_path(router_dir: str | Path) -> Path:
    return Path(str(router_dir) + ".lock")


class RouterLock:
    """``filelock.FileLock`` on ``<router dir>.lock``, never waiting: a held lock is an error."""

    def __init__(self, router_dir: str | Path) -> None:
        self.path = lock_path(router_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path), timeout=0)

    def __enter__(self) -> RouterLock:
        try:
            self._lock.acquire()
        except Timeout:
            raise LockHeldError(located(self.path, None, f"another retrain holds the lock {self.path}",
                                        fix="wait for it to finish (the lock frees itself when that process exits)")
                                ) from None
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()
