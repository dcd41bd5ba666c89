"""The router store: router.json + head.safetensors on disk, compatibility, versions, promotion, the lock.

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
import math
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
from vlrouter.core.encoder import model_fingerprint
from vlrouter.core.errors import CheckpointError, LockHeldError, StaleRouterError, located
from vlrouter.core.head import HeadShape, build_head, head_param_shapes
from vlrouter.core.layout import LAYOUT_DIM
from vlrouter.core.ood import LAYOUTS as OOD_LAYOUTS
from vlrouter.core.ood import MAX_LAYOUTS as OOD_MAX_LAYOUTS
from vlrouter.core.ood import MAX_RANK as OOD_MAX_RANK
from vlrouter.core.ood import TENSORS as OOD_TENSORS
from vlrouter.core.ood import OODModel
from vlrouter.core.paths import as_os_error, check_regular_file, ensure_dir, storage_error
from vlrouter.core.views import Representation

if TYPE_CHECKING:
    from vlrouter.core.registry import Registry

FORMAT_VERSION = 2  # 2: pooling is a list of views, layer a hidden-state index, optional OOD statistics
HEAD_FILE = "head.safetensors"
META_FILE = "router.json"
KEEP_VERSIONS = 3
TEMPERATURE_LIMITS = (1e-3, 1e3)  # calibration stays within (0.05, 20); anything outside is damage
MAX_META_BYTES = 64 << 20
# What a router folder holds (a plain folder at router.dir with only these is adopted as an old router).
ROUTER_ENTRIES = {META_FILE, HEAD_FILE, "tensorboard"}


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
    model_fingerprint: str | None = None  # the base weights alone (encoder.model_fingerprint): changed -> stale
    embedded_new: int = 0
    reused_cached: int = 0
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    vlrouter_version: str = ""

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        lo, hi = TEMPERATURE_LIMITS
        if not (math.isfinite(v) and lo <= v <= hi):
            raise ValueError(f"temperature {v!r} is not a finite number between {lo:g} and {hi:g}")
        return v


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

    out = ensure_dir(out_dir, field="router.dir")
    update: dict[str, Any] = {"vlrouter_version": meta.vlrouter_version or __version__}
    if ood is not None:
        update["ood"] = ood.meta()
    meta = meta.model_copy(update=update)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    if ood is not None:
        tensors.update({k: v.detach().float().cpu().contiguous() for k, v in ood.tensors().items()})
    try:
        save_file(tensors, str(out / HEAD_FILE), metadata={"format": "pt",
                                                          "vlrouter_format_version": str(FORMAT_VERSION)})
        (out / META_FILE).write_text(json.dumps(meta.model_dump(mode="json"), indent=2) + "\n")
        for f in (out / HEAD_FILE, out / META_FILE):
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    except Exception as e:
        os_err = as_os_error(e)
        if os_err is None:
            raise
        raise storage_error(os_err, out, field="router.dir") from None
    return out


def resolve_version(router_dir: str | Path) -> Path:
    """The version folder a (symlinked) router folder points at now: resolve once, then read from it."""
    return Path(os.path.realpath(router_dir))


def read_meta(router_dir: str | Path) -> RouterMeta:
    """router.json of ``router_dir``, validated; :class:`CheckpointError` naming the file otherwise."""
    mp = Path(router_dir) / META_FILE
    fix = "retrain with `router retrain`"
    if not mp.exists():
        raise CheckpointError(located(mp, None, "router.json not found",
                                      fix="train a router with `router retrain` (or `router train`)"))
    check_regular_file(mp, what="router.json", error=CheckpointError, fix=fix)
    try:
        if mp.stat().st_size > MAX_META_BYTES:
            raise CheckpointError(located(mp, None, f"{mp.stat().st_size:,} bytes is too large for a router.json",
                                          fix=fix))
        data = json.loads(mp.read_text())
    except OSError as e:
        raise CheckpointError(located(mp, None, f"cannot read: {e.strerror}", fix="check permissions")) from None
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
    width = meta.representation().width(meta.hidden_size)
    if width != meta.head.in_dim:
        raise CheckpointError(located(mp, "head.in_dim", f"the head takes {meta.head.in_dim} features, but "
                                      f"{meta.representation().label} of hidden size {meta.hidden_size} gives "
                                      f"{width}", fix=fix))
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
    from safetensors import SafetensorError, safe_open

    d = resolve_version(router_dir)
    meta = read_meta(d)
    hp = d / HEAD_FILE
    fix = "retrain with `router retrain`"
    if not hp.exists():
        raise CheckpointError(located(hp, None, "head.safetensors not found", fix=fix))
    check_regular_file(hp, what="head", error=CheckpointError, fix=fix)
    try:
        with safe_open(str(hp), framework="pt") as f:  # the header first: shapes are checked before allocating
            names = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names if not k.startswith("ood.")}
            expected = head_param_shapes(meta.head)
            if meta.ood is not None:
                _check_ood_shapes({k: tuple(f.get_slice(k).get_shape()) for k in names if k.startswith("ood.")},
                                  meta, hp)
            if shapes != expected:
                diff = sorted(set(shapes.items()) ^ set(expected.items()))[:2]
                raise CheckpointError(located(hp, None, f"weights do not match router.json's head shape "
                                              f"({meta.head.kind}, {meta.head.in_dim} -> {meta.head.num_labels}): "
                                              f"differs at {diff}", fix=fix))
            state = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(located(hp, None, f"{_sniff(hp)}; refusing to load it ({e}). vlrouter loads router "
                                      "weights only from safetensors, never from pickles",
                                      fix="retrain with `router retrain`, or import a seed checkpoint with "
                                          "`router import-seed-head`")) from None
    _check_weights(state, hp)
    extra = {k: v for k, v in state.items() if k.startswith("ood.")}
    head = build_head(meta.head)
    head.load_state_dict({k: v for k, v in state.items() if k not in extra}, strict=True)
    head.eval()
    ood = OODModel.from_saved(extra, meta.ood, where=d / META_FILE) if meta.ood is not None else None
    return Router(head=head, meta=meta, ood=ood, dir=d)


def _check_ood_shapes(shapes: dict[str, tuple], meta: RouterMeta, hp: Path) -> None:
    """The OOD tensors fit the head: class means [C, D], a basis [D, r] of at most MAX_RANK directions, [r] weights;
    the optional training layouts [M, LAYOUT_DIM], at most MAX_LAYOUTS of them."""
    c, d = meta.head.num_labels, meta.head.in_dim
    means, basis, weights = (shapes.get(k) for k in OOD_TENSORS)
    layouts = shapes.get(OOD_LAYOUTS)
    ok = means == (c, d) and basis is not None and len(basis) == 2 and basis[0] == d and \
        basis[1] <= OOD_MAX_RANK and weights == (basis[1],) and (
            layouts is None or len(layouts) == 2 and 0 < layouts[0] <= OOD_MAX_LAYOUTS and layouts[1] == LAYOUT_DIM)
    if not ok:
        raise CheckpointError(located(hp, "ood", f"the OOD statistics do not fit the head ({c} x {d}): {shapes}",
                                      fix="retrain with `router retrain`, or set router.ood: off"))


def _check_weights(state: dict, hp: Path) -> None:
    """Refuse NaN/inf weights and a standardizer that divides by zero: they route silently wrong."""
    import torch

    fix = "retrain with `router retrain`"
    for name, t in state.items():
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(located(hp, name, f"{bad} NaN/inf values in the router's weights", fix=fix))
    std = state.get("0.std")
    if std is not None and (std <= 0).any():
        raise CheckpointError(located(hp, "0.std", f"{int((std <= 0).sum())} zero or negative values in the "
                                      "standardizer's std (features would be divided by zero)", fix=fix))


# ---- compatibility ---------------------------------------------------------------------------

def same_base_model(recorded: str, registry: Registry, recorded_fingerprint: str | None = None) -> bool:
    """router.json's ``base_model`` names the registry's base model, from any working directory.

    Routers record a local folder as an absolute path (hub ids as they are). It matches
    the registry's ``base_model`` as written, or resolved against the registry's folder
    (same real path); or -- when the project folder was moved -- the registry's local
    folder has the weights fingerprint the router recorded.
    """
    if recorded in (registry.model.base_model, registry.base_model):
        return True
    local = registry.resolve(registry.model.base_model)
    rec = Path(recorded).expanduser()
    if not rec.is_absolute():
        rec = registry.resolve(recorded)
    if local.exists() and rec.exists() and os.path.realpath(rec) == os.path.realpath(local):
        return True
    return bool(recorded_fingerprint) and local.is_dir() and \
        model_fingerprint(str(local), registry.model.base_model_revision) == recorded_fingerprint


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
    """:func:`check_compatible` against ``registry`` (its adapters, base model, pooling and layer), then
    the base weights themselves: a router records ``model_fingerprint`` (config + weight files' sizes and
    times), so weights replaced in place under the same path make it stale too (cheap: no weights load)."""
    m = registry.model
    where = registry.router_dir / META_FILE
    same = same_base_model(meta.base_model, registry, meta.model_fingerprint)
    layer = m.router.layer
    check_compatible(meta, adapters=registry.adapter_names, base_model=None if same else m.base_model,
                     pooling=m.router.views, layer=None if layer == "auto" else int(layer), where=where)
    missing_local = registry.base_model_is_local() and not Path(registry.base_model).is_dir()
    if meta.model_fingerprint and not missing_local:  # a missing folder is the loader's error, not staleness
        now = model_fingerprint(registry.base_model, m.base_model_revision)
        if now != meta.model_fingerprint:
            raise StaleRouterError(located(where, "model_fingerprint", f"stale router: the base model's weights "
                                           f"changed since it was trained ({registry.base_model}: fingerprint {now}, "
                                           f"router trained on {meta.model_fingerprint})", fix="run `router retrain`"))


# ---- versions and promotion --------------------------------------------------------------

def versions_dir(live: str | Path) -> Path:
    live = Path(live)
    return live.parent / f".{live.name}.versions"


def check_router_location(live: str | Path) -> None:
    """Refuse a ``router.dir`` that names something vlrouter did not make: it would be moved and pruned.

    Fine: nothing there yet, the symlink vlrouter made (into the versions folder), or a
    plain router folder (router.json + head.safetensors [+ tensorboard/]: an older
    layout, adopted into the versions folder on promotion). Anything else -- a file, a
    folder of notes, the registry's own folder (``router.dir: .``), registry.yaml, a
    dataset -- is :class:`CheckpointError`, and nothing is touched.
    """
    live = Path(live)
    fix = "set router.dir in registry.yaml to a new path (e.g. runs/router), or move what is there away"
    if live.is_symlink():
        target = Path(os.path.realpath(live))
        vd = Path(os.path.realpath(versions_dir(live)))
        if target.parent == vd or (target / META_FILE).is_file() or not target.exists():
            return
        raise CheckpointError(located(live, "router.dir", f"is a symlink to {target}, which is not a router version; "
                                      "vlrouter would replace the link", fix=fix))
    if not live.exists():
        return
    if live.is_dir():
        entries = sorted(p.name for p in live.iterdir())
        others = [n for n in entries if n not in ROUTER_ENTRIES and not n.startswith(f".{META_FILE}.")]
        if META_FILE in entries and not others:
            return
        what = f"holds {', '.join(others[:3])}{' …' if len(others) > 3 else ''}" if others else "is empty" \
            if not entries else "holds no router.json"
        raise CheckpointError(located(live, "router.dir", f"names an existing folder that is not a router (it {what}); "
                                      "promotion would move it into the versions folder and prune it later",
                                      fix=fix))
    raise CheckpointError(located(live, "router.dir", "names an existing file, not a router folder; promotion would "
                                  "move it away and put a symlink in its place", fix=fix))


def new_version_dir(live: str | Path) -> Path:
    """A fresh, empty folder beside the live router to write a candidate into.

    Names sort by creation time (to the nanosecond), so pruning keeps the newest.
    """
    vd = ensure_dir(versions_dir(live), field="router.dir")
    ns = time.time_ns()  # one clock reading: the second and its nanoseconds must not straddle a tick
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(ns // 10**9))
    d = vd / f"{stamp}-{ns % 10**9:09d}-{uuid.uuid4().hex[:6]}"
    try:
        d.mkdir()
    except OSError as e:
        raise storage_error(e, d, field="router.dir") from None
    return d


def promote(candidate: str | Path, live: str | Path) -> Path:
    """Make ``candidate`` (a complete router folder) the live router, atomically.

    ``candidate`` is copied into the versions folder if it is elsewhere. A live router
    that is a plain router folder (older layout, or copied in by hand) is first moved
    into the versions folder too; anything else at ``live`` is refused
    (:func:`check_router_location`), never moved.
    """
    live = Path(live)
    cand = Path(candidate)
    check_router_location(live)
    load_router(cand)  # refuse to promote something that does not load (or holds NaN weights)
    vd = ensure_dir(versions_dir(live), field="router.dir")
    try:
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
    except shutil.Error as e:
        raise CheckpointError(located(cand, None, f"cannot copy the candidate into {vd}: {e}",
                                      fix="free disk space or make the folder writable")) from None
    except OSError as e:
        raise storage_error(e, vd, field="router.dir") from None
    _prune(live, cand)
    return live


def _prune(live: Path, newest: Path | None = None) -> None:
    """Keep the newest :data:`KEEP_VERSIONS` complete versions (the live one always); drop older folders.

    Incomplete folders (no router.json: a crash mid-write) are removed once older than
    ``newest`` (the candidate just promoted). Best effort: a folder that cannot be
    removed stays.
    """
    vd = versions_dir(live)
    current = Path(os.path.realpath(live)) if live.exists() else None
    versions = sorted((p for p in vd.iterdir() if p.is_dir()), key=lambda p: p.name)
    complete = [p for p in versions if (p / META_FILE).is_file()]
    keep = set(complete[-KEEP_VERSIONS:])
    cutoff = newest.name if newest is not None else None
    for old in versions:
        if old in keep or (current is not None and old.resolve() == current):
            continue
        if old not in complete and (cutoff is None or old.name >= cutoff):
            continue  # a candidate being written right now
        shutil.rmtree(old, ignore_errors=True)


# ---- one retrain at a time -------------------------------------------------------------------

def lock_path(router_dir: str | Path) -> Path:
    return Path(str(router_dir) + ".lock")


class RouterLock:
    """``filelock.FileLock`` on ``<router dir>.lock``, never waiting: a held lock is an error."""

    def __init__(self, router_dir: str | Path) -> None:
        check_router_location(router_dir)  # before anything is created beside it
        self.path = lock_path(router_dir)
        ensure_dir(self.path.parent, field="router.dir")
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
