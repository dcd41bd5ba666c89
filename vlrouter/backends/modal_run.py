"""Driving the Modal app from this machine: credentials, upload, the remote steps, download.

:func:`retrain_modal` is the ``modal`` backend's ``retrain``. In order:

1. Credentials, before anything else (no import of torch, nothing written): a Modal
   token from ``MODAL_TOKEN_ID`` + ``MODAL_TOKEN_SECRET`` or the Modal config file
   (``~/.modal.toml``, or ``MODAL_CONFIG_PATH``), read with Modal's own config reader.
   None: :class:`BackendError` naming ``modal token new``, at once.
2. "Connecting to Modal…", then a TCP probe of Modal's API servers bounded by
   ``VLROUTER_MODAL_CONNECT_TIMEOUT`` seconds (default 10): Modal's client itself
   retries an unreachable server for about a minute before it gives up.
3. Inside ``modal.enable_output()`` and ``app.run()``: build the routing dataset here
   (the seed's step 1), upload it with its screenshots to the data volume (step 2),
   ``process_shard`` over ``modal.cpu_shards`` CPU containers (step 3), ``embed`` on a
   GPU and ``train`` on a CPU container (step 4), then download the candidate router from the output
   volume into a fresh version folder beside the live router.
4. Return the candidate: :func:`vlrouter.core.recipe.run_retrain` applies the same eval
   gate and atomic promotion as for the local backend. The live router's accuracy on
   the same validation features is measured here (the live router is on this machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vlrouter.core.atomic import atomic_write_bytes
from vlrouter.core.data import METADATA_FILE, SPLITS, load_routing_dataset, read_routing_split
from vlrouter.core.errors import BackendError, DatasetError, RouterError, located
from vlrouter.core.model_size import weight_bytes
from vlrouter.core.progress import Progress, progress_or_null
from vlrouter.core.recipe import Candidate, RetrainRequest, SplitFeatures, build_dataset
from vlrouter.core.registry import Registry
from vlrouter.core.store import META_FILE, new_version_dir, read_meta

APP_MODULE = "vlrouter.backends.modal_app"
# The app module reads its settings from these at import time (see modal_app's docstring).
ENV_APP = "VLROUTER_MODAL_APP"
ENV_DATA_VOLUME = "VLROUTER_MODAL_DATA_VOLUME"
ENV_OUTPUT_VOLUME = "VLROUTER_MODAL_OUTPUT_VOLUME"
ENV_CHECKPOINTS_VOLUME = "VLROUTER_MODAL_CHECKPOINTS_VOLUME"
ENV_GPU = "VLROUTER_MODAL_GPU"
CONNECT_TIMEOUT_ENV = "VLROUTER_MODAL_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 10.0
CREDENTIALS_FIX = "run `modal token new`, or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"

# Modal's GPU types (https://modal.com/docs/guide/gpu); "TYPE:N" asks for N of them.
KNOWN_GPUS = ("T4", "L4", "A10", "A10G", "L40S", "A100", "A100-40GB", "A100-80GB", "RTX-PRO-6000",
              "H100", "H100!", "H200", "B200", "B200+")
# Memory of one such GPU in GB (Modal's GPU guide). vlrouter puts the model on one GPU: ":N" adds none to it.
GPU_MEMORY_GB = {"T4": 16, "L4": 24, "A10": 24, "A10G": 24, "L40S": 48, "A100": 40, "A100-40GB": 40, "A100-80GB": 80,
                 "RTX-PRO-6000": 96, "H100": 80, "H100!": 80, "H200": 141, "B200": 180, "B200+": 180}
GPU_HEADROOM = (1.10, 1.0)  # weights x 1.1 + 1 GB: CUDA context, LoRAs and the activations of small batches
UPLOAD_BATCH_FILES = 64  # files per Modal upload batch: the progress bar advances as each batch lands
UPLOAD_BATCH_BYTES = 512 << 20


# ---- 1. credentials -----------------------------------------------------------------------

def check_credentials() -> str:
    """Where the Modal token comes from (``"environment"`` or the profile); BackendError if none.

    Reads what Modal's client will read: ``modal.config.config`` (environment variables
    over the active profile of the config file). Fast: no network, no torch.
    """
    try:
        from modal import config as modal_config
    except Exception as e:  # a malformed ~/.modal.toml raises at import
        raise BackendError(located(None, None, f"cannot read the Modal configuration: {str(e).strip()}",
                                   fix=f"repair or remove the file, then {CREDENTIALS_FIX}")) from None
    cfg = modal_config.config
    profile = modal_config._profile
    path = modal_config.user_config_path
    token_id, token_secret = cfg.get("token_id"), cfg.get("token_secret")
    if token_id and token_secret:
        from_env = bool(os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"))
        return "environment" if from_env else f"profile {profile!r} of {path}"
    if cfg.get("oauth_refresh_token") and cfg.get("oauth_client_id") and (
            cfg.get("oauth_client_secret") or cfg.get("oauth_jwt_key")):
        return "OAuth settings"
    half = " (only one of token_id/token_secret is set)" if (token_id or token_secret) else ""
    raise BackendError(located(None, None, f"Modal credentials not found: no MODAL_TOKEN_ID/MODAL_TOKEN_SECRET in the "
                               f"environment and no token in profile {profile!r} of {path}{half}", fix=CREDENTIALS_FIX))


# ---- 2. reachability ------------------------------------------------------------------------

def connect_timeout() -> float:
    raw = os.environ.get(CONNECT_TIMEOUT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_CONNECT_TIMEOUT
    except ValueError:
        raise BackendError(located(None, CONNECT_TIMEOUT_ENV, f"{raw!r} is not a number of seconds",
                                   fix="e.g. 10")) from None


def _server_targets() -> list[tuple[str, int]]:
    from modal.config import config

    out = []
    for url in str(config.get("server_url") or "").split(","):
        o = urlparse(url.strip())
        if o.scheme in ("http", "https") and o.hostname:
            out.append((o.hostname, o.port or (443 if o.scheme == "https" else 80)))
    return out


def probe_modal(timeout: float | None = None) -> None:
    """Raise :class:`BackendError` unless a TCP connection to Modal's API opens within ``timeout`` s.

    Name resolution and connects run in a daemon thread, so a hanging DNS lookup is
    bounded too.
    """
    timeout = connect_timeout() if timeout is None else timeout
    targets = _server_targets()
    if not targets:  # a unix socket or a custom setup: let Modal's client decide
        return
    errors: list[str] = []
    ok = threading.Event()

    def attempt() -> None:
        deadline = time.monotonic() + timeout
        for host, port in targets:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                with socket.create_connection((host, port), timeout=left):
                    ok.set()
                    return
            except OSError as e:
                errors.append(f"{host}:{port}: {e.strerror or str(e) or type(e).__name__}")

    t = threading.Thread(target=attempt, name="vlrouter-modal-probe", daemon=True)
    t.start()
    t.join(timeout)
    if ok.is_set():
        return
    why = "; ".join(errors) if errors else f"no answer within {timeout:g} s"
    raise BackendError(located(None, None, f"cannot reach Modal ({why}); nothing was changed locally",
                               fix=f"check the network connection or proxy and run again; {CONNECT_TIMEOUT_ENV} sets "
                                   f"the wait, now {timeout:g} s"))


# ---- settings and the app module ------------------------------------------------------------

def validate_gpu(gpu: str, where: str = "modal.gpu") -> str:
    name, _, count = gpu.partition(":")
    known = {g.upper(): g for g in KNOWN_GPUS}
    if name.upper() not in known or (count and not (count.isdigit() and 1 <= int(count) <= 8)):
        raise BackendError(located(None, where, f"unknown Modal GPU {gpu!r}",
                                   fix=f"one of {', '.join(KNOWN_GPUS)}, optionally with :N for N GPUs, e.g. H100:2"))
    return known[name.upper()] + (f":{count}" if count else "")


def check_gpu_fits(gpu: str, registry: Registry, *, field: str, line: int | None = None,
                   dtype: str | None = None) -> str:
    """Refuse a GPU that cannot hold the base model's weights (a located BackendError); say why it fits.

    The weights' size comes from a local model's safetensors headers or the published
    Qwen3-VL sizes (:mod:`vlrouter.core.model_size`); an unknown size skips the check (the
    note says so). ``field`` names where the GPU was chosen (``--gpu``, ``modal.gpu``, ``serve.gpu``).
    """
    dtype = dtype or registry.model.router.dtype
    dtype = "bfloat16" if dtype in ("auto", None) else dtype
    size, how = weight_bytes(registry.base_model, dtype)
    kind = gpu.partition(":")[0]
    if size is None:
        return f"GPU memory not checked: {how}"
    need_gb = size / 1e9 * GPU_HEADROOM[0] + GPU_HEADROOM[1]
    have = GPU_MEMORY_GB.get(kind)
    if have is not None and need_gb > have:
        bigger = [g for g in ("L4", "L40S", "A100-80GB", "H100", "H200", "B200") if GPU_MEMORY_GB[g] >= need_gb]
        file = None if field.startswith("--") else registry.path
        raise BackendError(located(file, field, f"GPU {gpu} has {have} GB, but {registry.model.base_model} needs about "
                                   f"{need_gb:.1f} GB ({size / 1e9:.1f} GB of {dtype} weights, {how}, "
                                   "plus headroom)", line=line,
                                   fix=f"choose a larger GPU, e.g. {', '.join(bigger[:3]) or 'B200'}"
                                       + ("" if field.startswith("--") else f", with {field} in registry.yaml")))
    return f"{kind} ({have} GB) holds {size / 1e9:.1f} GB of weights ({how})"


def app_settings(registry: Registry, gpu: str | None = None) -> dict[str, str]:
    """The ``VLROUTER_MODAL_*`` values for the app, from registry.yaml's ``modal:`` (and ``--gpu``)."""
    m = registry.model.modal
    chosen = validate_gpu(gpu, "--gpu") if gpu else validate_gpu(m.gpu, f"{registry.path}: modal.gpu")
    return {ENV_APP: m.app_name, ENV_DATA_VOLUME: m.data_volume, ENV_OUTPUT_VOLUME: m.output_volume,
            ENV_CHECKPOINTS_VOLUME: m.checkpoints_volume, ENV_GPU: chosen}


def load_app(settings: dict[str, str]):
    """Import (or re-import) the app module with ``settings`` in the environment.

    The app, its volumes and GPU are defined at import time from ``VLROUTER_MODAL_*``;
    the variables are set only around the import, then restored.
    """
    import importlib

    with env_set(settings):
        mod = sys.modules.get(APP_MODULE)
        if mod is None:
            mod = importlib.import_module(APP_MODULE)
        elif any(mod.SETTINGS.get(k) != v for k, v in settings.items()):
            mod = importlib.reload(mod)
    return mod


@contextlib.contextmanager
def env_set(settings: dict[str, str]):
    """``settings`` in ``os.environ`` inside the block (a Modal app module reads them at import), then restored."""
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- upload: a routing dataset with its screenshots --------------------------------------------

def dataset_upload_plan(dataset_dir: str | Path) -> tuple[str, list[tuple[str, Path | bytes]]]:
    """``(name, [(path inside the dataset folder, local file or bytes), ...])`` for one routing dataset.

    A routing dataset points at its screenshots with paths relative to this machine's
    folders; the uploaded copy is self-contained: every image goes to
    ``images/<adapter>/<hash><ext>`` and the JSONL lines are rewritten to point there
    (nothing else in them changes). ``metadata.json`` gains an ``upload`` entry with the
    local folder and its fingerprint.
    """
    ds = load_routing_dataset(dataset_dir)
    plan: list[tuple[str, Path | bytes]] = []
    images: dict[str, str] = {}
    for split in SPLITS:
        if not ds.has_split(split):
            continue
        lines = []
        for s in read_routing_split(ds.dir / f"{split}.jsonl"):
            src = Path(s.image)
            if not src.is_file():
                raise DatasetError(located(s.source, "image", f"image not found: {src}",
                                           fix="restore it, or rebuild the dataset with `router build-dataset`"))
            rel = images.get(str(src))
            if rel is None:
                digest = hashlib.sha256(str(src).encode()).hexdigest()[:16]
                rel = f"images/{s.adapter}/{digest}{src.suffix.lower()}"
                images[str(src)] = rel
                plan.append((rel, src))
            record = dict(s.record)
            record["image"] = rel
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        plan.append((f"{split}.jsonl", "".join(lines).encode("utf-8")))
    meta = dict(ds.metadata)
    meta["upload"] = {"source_dir": str(ds.dir.resolve()), "source_fingerprint": ds.fingerprint(),
                      "images": len(images)}
    plan.append((METADATA_FILE, (json.dumps(meta, indent=2) + "\n").encode("utf-8")))
    return ds.dir.name, plan


def stage_dataset(dataset_dir: str | Path, data_root: str | Path) -> str:
    """Write the upload of ``dataset_dir`` under ``data_root/datasets/`` (what the data volume holds).

    Tests and offline runs use it to call the app's functions with ``.local()``.
    """
    name, plan = dataset_upload_plan(dataset_dir)
    dest = Path(data_root) / "datasets" / name
    for rel, src in plan:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            target.write_bytes(src)
        else:
            shutil.copyfile(src, target)
    return name


def _size(src: Path | bytes) -> int:
    return len(src) if isinstance(src, bytes) else Path(src).stat().st_size


def upload_batches(plan: list[tuple[str, Path | bytes]]) -> list[list[tuple[str, Path | bytes]]]:
    """``plan`` in batches of at most UPLOAD_BATCH_FILES files / UPLOAD_BATCH_BYTES bytes (a larger file alone)."""
    batches: list[list[tuple[str, Path | bytes]]] = []
    size = 0
    for item in plan:
        n = _size(item[1])
        if not batches or len(batches[-1]) >= UPLOAD_BATCH_FILES or (batches[-1] and size + n > UPLOAD_BATCH_BYTES):
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += n
    return batches


def _upload_plan(volume, prefix: str, plan: list[tuple[str, Path | bytes]], progress: Progress | None,
                 what: str) -> None:
    """Upload ``plan`` under ``prefix``. Modal transfers a batch when its ``with`` block ends, so the bar
    advances by a batch's files only after that: it counts files that reached the volume."""
    prog = progress_or_null(progress)
    total = sum(_size(src) for _, src in plan)
    with prog.task(f"{what} ({total / 1e6:.1f} MB)", total=len(plan)) as t:
        for part in upload_batches(plan):
            with volume.batch_upload(force=True) as batch:
                for rel, src in part:
                    batch.put_file(io.BytesIO(src) if isinstance(src, bytes) else src, f"{prefix}/{rel}")
            t.advance(len(part))


def upload_dataset(registry: Registry, dataset_dir: str | Path, *, progress: Progress | None = None,
                   mapp=None) -> str:
    """Upload a routing dataset and its screenshots to the data volume; return its path there.

    The seed's step 2 (``moe-lora-data:/datasets/routing_YYYYMMDD_HHMMSS/``). With
    ``mapp`` (inside a running :func:`retrain_modal`) no checks are repeated.
    """
    if mapp is None:
        check_credentials()
        progress_or_null(progress).log("Connecting to Modal…")
        probe_modal()
        mapp = load_app(app_settings(registry))
    name, plan = dataset_upload_plan(dataset_dir)
    prefix = f"/{mapp.DATASETS_DIR}/{name}"
    try:
        _upload_plan(mapp.VOLUMES[mapp.DATA_ROOT], prefix, plan, progress,
                     f"uploading {name} to volume {mapp.SETTINGS[ENV_DATA_VOLUME]}")
    except RouterError:
        raise
    except Exception as e:
        raise _modal_error("uploading the dataset", e) from None
    return f"{mapp.SETTINGS[ENV_DATA_VOLUME]}:{prefix}/"


def _model_slug(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def remote_base_model(mapp, base_model: str, progress: Progress | None = None) -> str:
    """A hub id stays as it is (downloaded once into the volume's HF cache); a local model
    folder is uploaded to the data volume (once per content) and named by its path there,
    ``/models/<content hash>/<folder name>`` (the name LoRA configs are checked against)."""
    folder = Path(base_model)
    if not folder.is_dir():
        return base_model
    slug = _model_slug(folder)
    prefix = f"/{mapp.MODELS_DIR}/{slug}/{folder.resolve().name}"
    vol = mapp.VOLUMES[mapp.DATA_ROOT]
    try:
        present = any(True for _ in vol.listdir(prefix))
    except Exception:  # NotFoundError: not uploaded yet
        present = False
    if not present:
        plan = [(str(p.relative_to(folder)), p) for p in sorted(folder.rglob("*")) if p.is_file()]
        _upload_plan(vol, prefix, plan, progress, f"uploading base model {folder.name}")
    return f"{mapp.DATA_ROOT}{prefix}"


# ---- the run ----------------------------------------------------------------------------------

def _modal_error(step: str, e: BaseException) -> BackendError:
    """A one-line BackendError for what Modal (or a container) raised during ``step``."""
    name = type(e).__name__
    msg = str(e).strip().splitlines()[0] if str(e).strip() else name
    try:
        import modal.exception as mexc

        if isinstance(e, mexc.AuthError):
            return BackendError(located(None, None, f"Modal refused the credentials while {step}: {msg}",
                                        fix=CREDENTIALS_FIX))
        if isinstance(e, mexc.ConnectionError):
            return BackendError(located(None, None, f"lost the connection to Modal while {step}: {msg}",
                                        fix="check the network and run again; features already embedded stay "
                                            "cached on the data volume"))
    except Exception:
        pass
    return BackendError(located(None, None, f"Modal run failed while {step}: {name}: {msg}",
                                fix="see Modal's output above; VLROUTER_DEBUG=1 shows the traceback"))


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def download_dir(volume, remote_prefix: str, dest: Path) -> list[Path]:
    """Copy every file under ``remote_prefix`` on ``volume`` into ``dest`` (same relative layout)."""
    from modal.volume import FileEntryType

    prefix = remote_prefix.strip("/")
    written = []
    for entry in volume.listdir(prefix, recursive=True):
        if entry.type != FileEntryType.FILE:
            continue
        rel = entry.path.strip("/")
        rel = rel[len(prefix):].lstrip("/") if rel.startswith(prefix) else rel
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            for chunk in volume.read_file(entry.path):
                f.write(chunk)
        written.append(target)
    return written


def finish_candidate(cand: Path, features: SplitFeatures, *, dataset_dir: Path,
                     modal_info: dict[str, Any]) -> Candidate:
    """The downloaded candidate as a local one: router.json names the local routing dataset
    (the uploaded copy differs only in image paths), the embed step's new/cached counts, and
    gains a ``modal`` entry."""
    ds = load_routing_dataset(dataset_dir)
    meta = read_meta(cand)
    metrics = {**meta.metrics, "dataset_dir": str(ds.dir), "modal": modal_info}
    meta = meta.model_copy(update={"metrics": metrics, "dataset_fingerprint": ds.fingerprint(),
                                   "embedded_new": int(features.stats.get("embedded_new", 0)),
                                   "reused_cached": int(features.stats.get("reused_cached", 0))})
    atomic_write_bytes(cand / META_FILE, (json.dumps(meta.model_dump(mode="json"), indent=2) + "\n").encode())
    return Candidate(dir=cand, dataset_dir=ds.dir, meta=meta, val_views=features.val,
                     val_labels=list(features.val_y), stats={"embed": features.stats, "modal": modal_info})


def retrain_modal(request: RetrainRequest) -> Candidate:
    """The ``modal`` backend (see the module docstring): a candidate router, not yet promoted."""
    check_credentials()  # first: nothing imported, nothing touched
    prog = progress_or_null(request.progress)
    registry, opts = request.registry, request.options
    settings = app_settings(registry, opts.gpu)
    fits = check_gpu_fits(settings[ENV_GPU], registry, field="--gpu" if opts.gpu else "modal.gpu",
                          line=None if opts.gpu else registry.line_of(("modal", "gpu")), dtype=opts.dtype)
    prog.log("Connecting to Modal…")
    probe_modal()
    mapp = load_app(settings)

    import modal

    run_id = new_run_id()
    shards = registry.model.modal.cpu_shards
    gpu = mapp.RESOURCES["embed"].get("gpu")
    step = "starting the app"
    cand: Path | None = None
    t0 = time.perf_counter()
    try:
        # Modal's own output (image build, container logs, map progress) goes to stderr, beside
        # our progress bars: stdout stays clean for `--json`.
        with contextlib.redirect_stdout(sys.stderr), modal.enable_output(), mapp.app.run():
            step = "building the routing dataset"
            ds_dir = build_dataset(registry, opts, request.progress)
            step = "uploading the dataset"
            name = ds_dir.name
            upload_dataset(registry, ds_dir, progress=request.progress, mapp=mapp)
            load_from = remote_base_model(mapp, opts.base_model, request.progress)
            step = f"processing on {shards} CPU containers"
            with prog.task(step, total=shards) as t:
                for _ in mapp.process_shard.map(range(shards), kwargs={
                        "num_shards": shards, "dataset": name, "base_model": load_from,
                        "revision": opts.base_model_revision, "max_prompt_tokens": opts.max_prompt_tokens},
                        order_outputs=False):
                    t.advance()
            step = f"embedding on {gpu}"
            with prog.task(step, total=None):
                embed_info = mapp.embed.remote(
                    name, run_id, load_from, layer=opts.layer, dtype=opts.dtype,
                    revision=opts.base_model_revision, batch_size=opts.embed_batch_size,
                    workers=max(1, min(opts.workers, int(mapp.RESOURCES["embed"].get("cpu", 1)))),
                    max_prompt_tokens=opts.max_prompt_tokens)
            prog.log(f"features: embedded {embed_info['embedded_new']} new, "
                     f"reused {embed_info['reused_cached']} cached")
            step = "training the head on a CPU container"
            with prog.task(step, total=None):
                tstats = mapp.train.remote(name, run_id, opts.model_dump(mode="json"), embed_info,
                                           registry_fingerprint=registry.fingerprint())
            step = "downloading the router"
            cand = new_version_dir(registry.router_dir)
            with prog.task(step, total=None), tempfile.TemporaryDirectory(prefix="vlrouter-features-") as tmp:
                download_dir(mapp.VOLUMES[mapp.OUTPUT_ROOT], tstats["router_path"], cand)
                local = Path(tmp) / "features.safetensors"
                with open(local, "wb") as f:
                    for chunk in mapp.VOLUMES[mapp.DATA_ROOT].read_file(embed_info["features"]):
                        f.write(chunk)
                features = SplitFeatures.from_file(local)
            features.stats.update(embedded_new=embed_info["embedded_new"], reused_cached=embed_info["reused_cached"])
            modal_info = {"run_id": run_id, "app": mapp.APP_NAME, "gpu": gpu, "gpu_check": fits, "cpu_shards": shards,
                          "dataset": f"/{mapp.DATASETS_DIR}/{name}", "router": tstats["router_path"],
                          "volumes": {k: settings[k] for k in (ENV_DATA_VOLUME, ENV_OUTPUT_VOLUME,
                                                               ENV_CHECKPOINTS_VOLUME)},
                          "checkpoints_on_volume": tstats.get("checkpoints_on_volume"),
                          "seconds": round(time.perf_counter() - t0, 1)}
            candidate = finish_candidate(cand, features, dataset_dir=ds_dir, modal_info=modal_info)
            candidate.stats["train"] = tstats.get("train")
    except BaseException as e:
        if cand is not None:
            shutil.rmtree(cand, ignore_errors=True)
        if isinstance(e, (RouterError, KeyboardInterrupt, SystemExit)):
            raise
        if isinstance(e, Exception):
            raise _modal_error(step, e) from e
        raise
    return candidate
