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
from vlrouter.core.atomic import atomic_write_bytes
from vlrouter.core.encoder import model_fingerprint
from vlrouter.core.errors import (
    CheckpointError,
    LockHeldError,
    PromotionRefused,
    StaleRouterError,
    located,
)
from vlrouter.core.fit import as_labels
from vlrouter.core.head import HeadShape, build_head, head_logits, head_param_shapes
from vlrouter.core.paths import as_os_error, check_regular_file, ensure_dir, storage_error

if TYPE_CHECKING:
    from vlrouter.core.registry import Registry

FORMAT_VERSION = 1
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


def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        return "a torch.save zip archive (pickle inside)"
    if head[:1] == b"\x80":
        return "a Python pickle"
    return "not a safetensors file"


# ---- writing and reading one router folder --------------------------------------------------

def save_router(out_dir: str | Path, head, meta: RouterMeta) -> Path:
    """Write ``head.safetensors`` + ``router.json`` into ``out_dir`` (a fresh folder), fsynced."""
    from safetensors.torch import save_file

    out = ensure_dir(out_dir, field="router.dir")
    meta = meta.model_copy(update={"vlrouter_version": meta.vlrouter_version or __version__})
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
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
    if meta.hidden_size != meta.head.in_dim:
        raise CheckpointError(located(mp, "hidden_size", f"hidden_size {meta.hidden_size} but the head takes "
                                      f"{meta.head.in_dim} features", fix=fix))
    return meta


def load_router(router_dir: str | Path):
    """Return ``(head, meta)`` of one router version; the head is an eval-mode fp32 module on CPU.

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
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
            expected = head_param_shapes(meta.head)
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
    head = build_head(meta.head)
    head.load_state_dict(state, strict=True)
    head.eval()
    return head, meta


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
                     pooling: str | None = None, layer: int | None = None, where: str | Path = META_FILE) -> None:
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


def check_router_for(meta: RouterMeta, registry: Registry) -> None:
    """:func:`check_compatible` against ``registry`` (its adapters, base model, pooling and layer), then
    the base weights themselves: a router records ``model_fingerprint`` (config + weight files' sizes and
    times), so weights replaced in place under the same path make it stale too (cheap: no weights load)."""
    m = registry.model
    where = registry.router_dir / META_FILE
    same = same_base_model(meta.base_model, registry, meta.model_fingerprint)
    check_compatible(meta, adapters=registry.adapter_names, base_model=None if same else m.base_model,
                     pooling=m.router.pooling, layer=m.router.layer, where=where)
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
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = vd / f"{stamp}-{time.time_ns() % 10**9:09d}-{uuid.uuid4().hex[:6]}"
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


# ---- the eval gate -------------------------------------------------------------------------

@dataclass
class GateDecision:
    promoted: bool
    message: str
    val_acc: float | None
    live_val_acc: float | None
    n_val: int | None


def live_accuracy(live_dir: str | Path, candidate: RouterMeta, val_feats, val_labels) -> tuple[float | None, str]:
    """The live router's accuracy on the candidate's validation features, read from ONE live version.

    ``(None, why)`` when there is no live router, it does not load, or it is not
    comparable (other labels, or features from another encoder).
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
    if val_feats is None or val_labels is None:
        return None, "no validation features to compare on"
    try:
        acc = float((head_logits(head, val_feats).argmax(1) == as_labels(val_labels)).float().mean())
    except RuntimeError:
        return None, "the live router does not fit these features"
    return acc, ""


def balanced_accuracy(head, val_feats, val_labels) -> tuple[float, int]:
    """``(mean per-class recall, classes present)`` of ``head`` on the validation samples.

    Chance is ``1 / classes``: a head that answers one adapter for everything (or guesses)
    scores exactly that, however imbalanced the validation split is.
    """
    import torch

    y = as_labels(val_labels)
    pred = head_logits(head, val_feats).argmax(1)
    classes = torch.unique(y)
    recalls = [float((pred[y == c] == c).float().mean()) for c in classes]
    return sum(recalls) / len(recalls), len(recalls)


def _refuse(cand: Path, problem: str, fix: str, val_acc=None, live_acc=None) -> PromotionRefused:
    err = PromotionRefused(located(cand, None, problem, fix=fix))
    err.candidate_dir, err.val_acc, err.live_val_acc = str(cand), val_acc, live_acc
    return err


def check_candidate(cand: Path, meta: RouterMeta, head=None, val_feats=None, val_labels=None) -> None:
    """Refuse (even with ``--force``) a candidate that is not a router at all: non-finite numbers, or no
    better than chance on its validation samples -- e.g. a head trained with ``lr: 1e3`` that answers one
    adapter for everything. Measured with the candidate's head on the validation features when given
    (balanced accuracy vs ``1 / classes``), else from router.json's metrics."""
    val_acc, best_loss = meta.metrics.get("val_acc"), meta.best_loss
    fix = "check train.lr and the other train: settings, and the training data; then retrain"
    for name, v in {"val_acc": val_acc, "best_loss": best_loss}.items():
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise _refuse(cand, f"{name} is {v!r}: training diverged; not promoted (not even with --force)", fix,
                          val_acc)
    if head is not None and val_feats is not None and val_labels is not None and len(val_labels):
        score, classes = balanced_accuracy(head, val_feats, val_labels)
        what, n = "balanced accuracy (mean recall per adapter)", len(val_labels)
    else:
        per = meta.metrics.get("per_class") or {}
        recalls = [c.get("recall") for c in per.values() if isinstance(c, dict) and c.get("support")]
        if recalls and all(isinstance(r, (int, float)) for r in recalls):
            score, classes, what = sum(recalls) / len(recalls), len(recalls), "balanced accuracy"
        elif isinstance(val_acc, (int, float)):
            score, classes, what = val_acc, len(meta.adapters), "validation accuracy"
        else:
            raise _refuse(cand, "router.json has no validation accuracy; not promoted", fix)
        n = meta.metrics.get("n_val")
    chance = 1.0 / max(1, classes)
    if not score > chance + 1e-9:
        raise _refuse(cand, f"new router's {what} {score:.3f} does not beat chance {chance:.3f} on {n} validation "
                      "samples (it answers no better than one adapter for everything); not promoted (not even "
                      "with --force)", fix + " (more samples per adapter help)", val_acc)


def promote_with_gate(candidate_dir: str | Path, live_dir: str | Path, *, val_feats=None, val_labels=None,
                      force: bool = False, stamp: dict[str, Any] | None = None) -> GateDecision:
    """Promote the candidate unless it scored below the live router on the same validation samples.

    First :func:`check_candidate`: a candidate with non-finite numbers or no better than
    chance is never promoted. The live router is read once (:func:`live_accuracy`). Below
    it and not ``force``: :class:`PromotionRefused` with both numbers; the live router is
    left untouched and the candidate stays in its version folder. ``stamp`` holds
    router.json fields recorded on this machine before promotion (``base_model``,
    ``model_fingerprint``: what the engine here will compare against).
    """
    cand, live = Path(candidate_dir), Path(live_dir)
    check_router_location(live)
    head, meta = load_router(cand)  # whole and finite, or CheckpointError
    if stamp:
        meta = meta.model_copy(update=stamp)
    check_candidate(cand, meta, head, val_feats, val_labels)
    val_acc = meta.metrics.get("val_acc")
    n_val = meta.metrics.get("n_val")
    live_acc, note = live_accuracy(live, meta, val_feats, val_labels)

    def fmt(a: float | None) -> str:
        return f"{a:.3f}" if isinstance(a, (int, float)) else "n/a"

    same = f"on the same {n_val} validation samples"
    if live_acc is not None and val_acc is not None and val_acc < live_acc:
        if not force:
            raise _refuse(cand, f"new router {fmt(val_acc)} < live {fmt(live_acc)} {same}; kept the live router, "
                          "the candidate stays here", "--force to promote anyway", val_acc, live_acc)
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
