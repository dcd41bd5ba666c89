"""The Modal app behind ``router retrain --backend modal``: processing, embedding (GPU), head training (CPU).

What runs where (the seed's workflow, steps 3 and 4)::

    process_shard   CPU containers, fanned out with .map over shards: decode images, chat
                    template, processor -> per-sample tensors on the data volume
                    (/data/preprocessed/<dataset>/<model>/<split>/sample_000000.safetensors)
    embed           one GPU: the frozen Qwen3-VL forwards the processed samples; pooled
                    features go into the content-addressed feature cache on the data volume
                    (/data/features/cache/<encoder fp>/...), so a re-run embeds only new samples
    train           one CPU container (the head trains on cached features in seconds, one
                    thread): head training, temperature calibration, evaluation; the candidate
                    router (head.safetensors + router.json) goes to the output volume
                    (/output/routers/<run id>/), TensorBoard logs to /output/tensorboard/

Every body calls the same ``vlrouter.core`` functions the local backend calls; nothing
of the pipeline is re-implemented here. The bodies take their roots as parameters
(defaulting to the mount points in :data:`VOLUMES`), so tests run them in-process with
``.local()`` against temporary folders.

The app is defined when this module is imported, so its settings come from environment
variables that :mod:`vlrouter.backends.modal_run` sets from registry.yaml's ``modal:``
section before importing it (and that it passes on to the containers, which import this
module again):

    VLROUTER_MODAL_APP                 app name            (default "vlrouter")
    VLROUTER_MODAL_DATA_VOLUME         datasets + features (default "moe-lora-data")
    VLROUTER_MODAL_OUTPUT_VOLUME       routers             (default "routing-output")
    VLROUTER_MODAL_CHECKPOINTS_VOLUME  LoRA checkpoints    (default "moe-lora-checkpoints")
    VLROUTER_MODAL_GPU                 GPU of embed        (default "H100")

Importing this module needs no network and no Modal credentials: volumes are looked up
lazily (``Volume.from_name``), the image is built on the first ``app.run()``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import modal

from vlrouter.backends.modal_run import (
    ENV_APP,
    ENV_CHECKPOINTS_VOLUME,
    ENV_DATA_VOLUME,
    ENV_GPU,
    ENV_OUTPUT_VOLUME,
)
from vlrouter.core.data import SPLITS, load_routing_dataset
from vlrouter.core.encoder import Encoder, set_prompt_token_limit
from vlrouter.core.features import (
    FeatureCache,
    _processor_for,
    digest_shard,
    embed_prepared_items,
    feature_key,
    prepare_shard,
)
from vlrouter.core.options import TrainOptions
from vlrouter.core.recipe import SplitFeatures, embed_splits, fit_candidate, layers_to_embed
from vlrouter.core.views import CACHED_VIEWS, view_key

# ---- settings (env, set by modal_run before import) -------------------------------------

DEFAULTS = {
    ENV_APP: "vlrouter",
    ENV_DATA_VOLUME: "moe-lora-data",
    ENV_OUTPUT_VOLUME: "routing-output",
    ENV_CHECKPOINTS_VOLUME: "moe-lora-checkpoints",
    ENV_GPU: "H100",
}


def settings_from_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The app's settings: each ``VLROUTER_MODAL_*`` variable, or its default."""
    env = os.environ if environ is None else environ
    return {k: (env.get(k) or v) for k, v in DEFAULTS.items()}


SETTINGS = settings_from_env()
APP_NAME = SETTINGS[ENV_APP]
GPU = SETTINGS[ENV_GPU]

# Mount points. The function bodies default their roots to these.
DATA_ROOT = "/data"  # moe-lora-data: datasets/, preprocessed/, features/, models/, hf-cache/
OUTPUT_ROOT = "/output"  # routing-output: routers/<run id>/, tensorboard/
CHECKPOINTS_ROOT = "/checkpoints"  # moe-lora-checkpoints: the LoRA adapters, one folder per adapter name

# Layout on the data volume (relative to DATA_ROOT) and the output volume (to OUTPUT_ROOT).
DATASETS_DIR = "datasets"
PREPROCESSED_DIR = "preprocessed"
FEATURE_CACHE_DIR = "features/cache"
FEATURE_RUNS_DIR = "features/runs"
MODELS_DIR = "models"
HF_CACHE_DIR = "hf-cache"
ROUTERS_DIR = "routers"

# The project's runtime dependencies (pyproject.toml) with their ranges; the image pins each to the version
# installed here -- what the tests ran with -- so a cloud run computes with the same torch / transformers / peft
# as a local one (the ranges apply only to a package missing here). Inside a container the pins read back the
# same versions, so the container defines the same image.
DEPENDENCIES = {
    "torch": ">=2.4",
    "transformers": ">=5,<6",
    "peft": ">=0.17",
    "tokenizers": ">=0.21",
    "safetensors": ">=0.4",
    "pillow": ">=10",
    "numpy": ">=1.26",
    "pydantic": ">=2.7",
    "ruamel.yaml": ">=0.18",
    "pluggy": ">=1.5",
    "rich": ">=13",
    "typer": ">=0.12",
    "filelock": ">=3.12",
    "tensorboard": ">=2.15",
    "fastapi": ">=0.115",  # the server (vlrouter.serve): the serving containers use the same image
    "uvicorn": ">=0.30",
    "httpx": ">=0.27",
}


def pinned_packages(deps: dict[str, str] = DEPENDENCIES) -> list[str]:
    """``name==version`` for each dependency, the version installed here (a local build tag such as torch's
    ``+cpu`` dropped: the image takes the CUDA wheel of the same release)."""
    out = []
    for name, spec in deps.items():
        try:
            out.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name}{spec}")
    return out


PIP_PACKAGES = pinned_packages()

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(*PIP_PACKAGES)
    .env({"TOKENIZERS_PARALLELISM": "false"})
    .add_local_python_source("vlrouter")
)

VOLUMES: dict[str, modal.Volume] = {
    DATA_ROOT: modal.Volume.from_name(SETTINGS[ENV_DATA_VOLUME], create_if_missing=True),
    OUTPUT_ROOT: modal.Volume.from_name(SETTINGS[ENV_OUTPUT_VOLUME], create_if_missing=True),
    CHECKPOINTS_ROOT: modal.Volume.from_name(SETTINGS[ENV_CHECKPOINTS_VOLUME], create_if_missing=True),
}

# GPU type, timeouts (s; Modal's limit is 24 h), retries, CPU cores and memory (MiB) per function.
RESOURCES: dict[str, dict[str, Any]] = {
    "process_shard": {"cpu": 2.0, "memory": 4096, "timeout": 1800, "retries": 2},
    # Qwen3-VL-8B in bf16 is ~17.5 GB of weights; from_pretrained stages them in host RAM.
    "embed": {"gpu": GPU, "cpu": 4.0, "memory": 32768, "timeout": 3600, "retries": 1},
    # Head training reads cached features and fits on one CPU thread: no GPU to hold (and bill) meanwhile.
    "train": {"cpu": 2.0, "memory": 8192, "timeout": 3600, "retries": 1},
}

# Which volumes each function mounts (keys of VOLUMES).
MOUNTS: dict[str, tuple[str, ...]] = {
    "process_shard": (DATA_ROOT,),
    "embed": (DATA_ROOT,),
    "train": (DATA_ROOT, OUTPUT_ROOT, CHECKPOINTS_ROOT),
}

# Passed to every container: the same settings (so the container's import of this module
# defines the same app), and the Hugging Face cache on the data volume (the 8B weights
# are downloaded once, not on every container start).
CONTAINER_ENV: dict[str, str] = {
    **SETTINGS,
    "HF_HOME": f"{DATA_ROOT}/{HF_CACHE_DIR}",
    "VLROUTER_NO_ENTRY_POINTS": "1",
}

app = modal.App(APP_NAME, image=image)


def function_options(name: str) -> dict[str, Any]:
    """The keyword arguments of ``@app.function`` for ``name``, from RESOURCES and MOUNTS."""
    opts = dict(RESOURCES[name])
    opts["volumes"] = {mount: VOLUMES[mount] for mount in MOUNTS[name]}
    opts["env"] = dict(CONTAINER_ENV)
    return opts


# ---- volume sync (only inside a container) ------------------------------------------------

def _sync(root: str | Path, op: str) -> None:
    """``commit`` / ``reload`` the volume mounted at ``root``; a no-op outside Modal."""
    if modal.is_local():
        return
    vol = VOLUMES.get(str(root))
    if vol is not None:
        getattr(vol, op)()


# ---- layout helpers (shared with modal_run) --------------------------------------------------

def model_slug(base_model: str, revision: str | None = None) -> str:
    """Folder name for what a processor produced: depends on the base model (and revision) only."""
    return hashlib.sha256(f"{base_model}@{revision or 'main'}".encode()).hexdigest()[:12]


def safe_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        raise ValueError(f"not a safe folder name: {name!r}")
    return name


def dataset_items(dataset_dir: str | Path) -> list[tuple[str, int, Any]]:
    """``(split, index, Sample)`` for every split the routing dataset has, in a fixed order."""
    ds = load_routing_dataset(dataset_dir)
    items = []
    for split in SPLITS:
        if ds.has_split(split):
            items.extend((split, i, s) for i, s in enumerate(ds.split(split)))
    return items


def preprocessed_path(root: Path, split: str, index: int) -> Path:
    return root / split / f"sample_{index:06d}.safetensors"



# ---- the functions -------------------------------------------------------------------------

@app.function(**function_options("process_shard"))
def process_shard(shard: int, *, num_shards: int, dataset: str, base_model: str, revision: str | None = None,
                  data_root: str = DATA_ROOT, chunk: int = 8, max_prompt_tokens: int | None = None) -> dict[str, Any]:
    """CPU: process shard ``shard`` of ``num_shards`` (every ``num_shards``-th sample).

    Fanned out with ``process_shard.map(range(num_shards), kwargs={...})``.

    :func:`vlrouter.core.features.prepare_shard` (image + chat template + processor: the
    CPU stage the local backend runs in its worker pool) and
    :func:`~vlrouter.core.features.digest_shard` (the pixel digest in the feature-cache
    key), saved as one safetensors file per sample, digest in its metadata, at
    ``preprocessed/<dataset>/<model>/<split>/sample_000000.safetensors``. Samples
    already processed are skipped, so a retried or repeated run resumes.
    """
    from safetensors.torch import save_file

    root = Path(data_root)
    _sync(root, "reload")
    ds_dir = root / DATASETS_DIR / safe_name(dataset)
    out_root = root / PREPROCESSED_DIR / safe_name(dataset) / model_slug(base_model, revision)
    mine = dataset_items(ds_dir)[shard::num_shards]
    if max_prompt_tokens is not None:  # registry.yaml's router.max_prompt_tokens, as on the caller's machine
        set_prompt_token_limit(_processor_for(base_model, revision), max_prompt_tokens)
    todo = [(split, i, s) for split, i, s in mine if not preprocessed_path(out_root, split, i).is_file()]
    for start in range(0, len(todo), chunk):  # bounded memory: a screenshot's pixel tensor is megabytes
        part = todo[start:start + chunk]
        samples = [s for _, _, s in part]
        for (split, i, s), prepared, digest in zip(part, prepare_shard(base_model, samples, revision=revision),
                                                   digest_shard(samples)):
            path = preprocessed_path(out_root, split, i)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({k: v.contiguous() for k, v in prepared.items()}, str(tmp),
                      metadata={"id": s.id, "digest": digest, "adapter": s.adapter, "label": str(s.label)})
            os.replace(tmp, path)
    if todo:
        _sync(root, "commit")
    return {"shard": shard, "samples": len(mine), "processed": len(todo), "reused": len(mine) - len(todo)}


@app.function(**function_options("embed"))
def embed(dataset: str, run_id: str, base_model: str, *, layer: str | int = "auto",
          dtype: str | None = None, revision: str | None = None, batch_size: int = 8, workers: int = 1,
          data_root: str = DATA_ROOT, max_prompt_tokens: int | None = None) -> dict[str, Any]:
    """GPU: every pooled view of every sample at the layers ``router.layer`` asks for, into the feature cache.

    1. Samples that ``process_shard`` prepared and the cache lacks are forwarded in
       batches of ``batch_size``: :func:`~vlrouter.core.features.collate` +
       :meth:`~vlrouter.core.encoder.Encoder.embed_prepared` + ``FeatureCache.put``,
       what :func:`~vlrouter.core.features.embed_dataset` does with its own pool's output.
    2. :func:`~vlrouter.core.recipe.embed_splits` -- the local backend's step -- then finds
       them cached (and embeds any sample that was not prepared).

    Every split's features are saved at ``features/runs/<run_id>.safetensors``
    (:meth:`~vlrouter.core.recipe.SplitFeatures.to_file`): ``train`` fits on them, and the
    eval gate on the caller's machine scores the live router on the same validation
    samples. ``base_model`` is the path or hub id the weights load from (the Hugging Face
    cache is on this volume).
    """
    from safetensors import safe_open

    root = Path(data_root)
    _sync(root, "reload")
    ds_dir = root / DATASETS_DIR / safe_name(dataset)
    pre_root = root / PREPROCESSED_DIR / safe_name(dataset) / model_slug(base_model, revision)
    encoder = Encoder.load(base_model, dtype=dtype, revision=revision)
    if max_prompt_tokens is not None:
        set_prompt_token_limit(encoder.processor, max_prompt_tokens)
    fp = encoder.fingerprint()
    cache = FeatureCache(root / FEATURE_CACHE_DIR, fp)
    layers = layers_to_embed(layer, encoder.num_layers)
    names = [view_key(v, n) for n in layers for v in CACHED_VIEWS]
    items = dataset_items(ds_dir)

    missing: dict[str, Path] = {}
    for split, i, s in items:
        path = preprocessed_path(pre_root, split, i)
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                key = feature_key(fp, f.metadata()["digest"], s.prompt)
            if cache.get(key, names) is None:
                missing.setdefault(key, path)
    todo = list(missing.items())
    for start in range(0, len(todo), batch_size):
        part = todo[start:start + batch_size]
        prepared = []
        for _, path in part:
            with safe_open(str(path), framework="pt") as f:
                prepared.append({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open: no __iter__)
        embed_prepared_items(encoder, cache, [key for key, _ in part], prepared, layers, batch_size=len(part),
                             ids=[path.stem for _, path in part])

    features = embed_splits(ds_dir, encoder, root / FEATURE_CACHE_DIR, layers=layers, workers=workers,
                            batch_size=batch_size)
    out = features.to_file(root / FEATURE_RUNS_DIR / f"{safe_name(run_id)}.safetensors")
    _sync(root, "commit")
    forwarded = len(todo) + int(features.stats["forwarded"])
    return {
        "dataset": dataset,
        "run_id": run_id,
        "load_from": base_model,
        "revision": revision,
        "encoder_fingerprint": fp,
        "hidden_size": encoder.hidden_size,
        "dtype": encoder.dtype_name,
        "layers": layers,
        "samples": len(items),
        "embedded_new": forwarded,
        "reused_cached": len(items) - forwarded,
        "features": str(out.relative_to(root)),
    }


@app.function(**function_options("train"))
def train(dataset: str, run_id: str, options: dict[str, Any], embed_info: dict[str, Any], *,
          registry_fingerprint: str | None = None, data_root: str = DATA_ROOT, output_root: str = OUTPUT_ROOT,
          checkpoints_root: str = CHECKPOINTS_ROOT) -> dict[str, Any]:
    """Fit a candidate router on the features ``embed`` saved: :func:`vlrouter.core.recipe.fit_candidate`.

    The local backend's fit step, unchanged: train, calibrate, evaluate, write the candidate
    router (head.safetensors + router.json + tensorboard/) to ``routers/<run_id>/`` on the
    output volume. The eval gate and promotion run afterwards on the caller's side. Also
    reports which adapters have a LoRA checkpoint folder on the checkpoints volume.
    """
    root, out_root = Path(data_root), Path(output_root)
    _sync(root, "reload")
    opts = TrainOptions.model_validate({**options, "workers": 1, "device": None})
    features = SplitFeatures.from_file(root / embed_info["features"])
    # router.json records the registry's base model, not the volume path the weights loaded from
    features.encoder = replace(features.encoder, base_model=opts.base_model)
    cand = out_root / ROUTERS_DIR / safe_name(run_id)
    cand.parent.mkdir(parents=True, exist_ok=True)
    result = fit_candidate(root / DATASETS_DIR / safe_name(dataset), features, opts, out_dir=cand,
                           registry_fingerprint=registry_fingerprint)
    _sync(out_root, "commit")
    ck = Path(checkpoints_root)
    return _jsonable({
        "adapters": list(result.meta.adapters),
        "val_acc": result.meta.metrics["val_acc"],
        "train": result.stats["train"],
        "checkpoints_on_volume": {n: (ck / n / "adapter_config.json").is_file() for n in result.meta.adapters},
        "router_path": str(cand.relative_to(out_root)),
    })


def _jsonable(obj: Any) -> Any:
    """Plain JSON types only (what comes back from a container must not need vlrouter to unpickle)."""
    return json.loads(json.dumps(obj, default=str))
