"""Retraining as plain steps: build → embed → fit → write candidate → gate → promote, and the use-cases on them.

::

    build_dataset(registry, options)                   -> routing_YYYYMMDD_HHMMSS/        (core.data)
    embed_splits(dataset, options, cache_root)         -> SplitFeatures (cache misses only) (core.features)
    fit_candidate(dataset, features, options, out_dir) -> Candidate: head + router.json      (core.fit, core.metrics)
    promote_with_gate(candidate, live, val features)   -> promoted, or PromotionRefused      (core.store)

A *backend* is a function ``RetrainRequest -> Candidate`` that runs the first three
steps somewhere (``local``: in this process; ``modal``: on Modal). The caller picks it
(the CLI, through the plugin manager) and passes it in: nothing here imports a backend.
The gate and promotion always run here, under the router lock.

Use-cases: :func:`run_retrain` (``router retrain``), :func:`run_train` (``router train``:
the same recipe on a given dataset, in this process), :func:`run_embed`,
:func:`evaluate_router` (``router eval``), :func:`edit_adapters` (``add-adapter`` /
``remove-adapter``: retrain for the edited registry, then save registry.yaml).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlrouter.core.data import SPLITS, build_routing_dataset, load_routing_dataset, newest_routing_dataset
from vlrouter.core.encoder import Encoder, EncoderInfo, model_fingerprint, set_prompt_token_limit
from vlrouter.core.errors import DatasetError, StaleRouterError, TrainingError, located
from vlrouter.core.features import FeatureCache, check_features, embed_dataset
from vlrouter.core.fit import train_head
from vlrouter.core.head import HeadShape, head_logits
from vlrouter.core.metrics import calibrate_temperature, evaluate
from vlrouter.core.options import TrainOptions, resolve_options
from vlrouter.core.paths import ensure_dir
from vlrouter.core.progress import Progress, progress_or_null
from vlrouter.core.registry import Registry, fingerprint_labels
from vlrouter.core.store import (
    RouterLock,
    RouterMeta,
    load_router,
    new_version_dir,
    promote_with_gate,
    same_base_model,
    save_router,
)

if TYPE_CHECKING:
    import torch


# ---- what flows between the steps --------------------------------------------------------------

@dataclass
class RetrainRequest:
    """What a backend gets: the registry to train for (possibly edited, unsaved) and resolved options."""

    registry: Registry
    options: TrainOptions
    progress: Progress | None = None


@dataclass
class SplitFeatures:
    """Pooled features of a routing dataset's splits, with the labels and the encoder they came from."""

    class_names: list[str]
    encoder: EncoderInfo
    train: torch.Tensor
    train_y: list[int]
    val: torch.Tensor
    val_y: list[int]
    eval: torch.Tensor | None = None
    eval_y: list[int] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # embed stats: embedded_new, reused_cached, …

    def to_file(self, path: str | Path) -> Path:
        """One safetensors file (tensors + JSON metadata): how a remote backend hands features to its fit step."""
        import torch
        from safetensors.torch import save_file

        tensors = {"train": self.train.contiguous(), "val": self.val.contiguous(),
                   "train_y": torch.tensor(self.train_y, dtype=torch.long),
                   "val_y": torch.tensor(self.val_y, dtype=torch.long)}
        if self.eval is not None:
            tensors.update(eval=self.eval.contiguous(), eval_y=torch.tensor(self.eval_y, dtype=torch.long))
        meta = {"class_names": self.class_names, "encoder": asdict(self.encoder), "stats": self.stats}
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out), metadata={"vlrouter": json.dumps(meta, default=str)})
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> SplitFeatures:
        """Read :meth:`to_file`'s output; :class:`TrainingError` naming the file when it is missing or damaged."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["vlrouter"])
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (OSError, SafetensorError, KeyError, ValueError) as e:
            raise TrainingError(located(path, None, f"no usable features file ({type(e).__name__}: {e})",
                                        fix="run the embed step again (`router retrain` rebuilds it)")) from None
        return cls(class_names=list(meta["class_names"]), encoder=EncoderInfo(**meta["encoder"]),
                   train=t["train"], train_y=t["train_y"].tolist(), val=t["val"], val_y=t["val_y"].tolist(),
                   eval=t.get("eval"), eval_y=t["eval_y"].tolist() if "eval_y" in t else [], stats=meta["stats"])


@dataclass
class Candidate:
    """What a backend returns: a complete router in a fresh version folder, not yet promoted."""

    dir: Path
    dataset_dir: Path
    meta: RouterMeta
    val_features: torch.Tensor  # for the gate: the live router is scored on the same samples
    val_labels: list[int]
    stats: dict[str, Any] = field(default_factory=dict)  # embed / train stats


@dataclass
class RetrainResult:
    router_dir: str  # the live router folder (symlink) after the run
    candidate_dir: str  # where the new router was written
    promoted: bool
    adapters: list[str]
    val_acc: float
    live_val_acc: float | None  # the previous router's accuracy on the same validation samples
    embedded_new: int
    reused_cached: int
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    dataset_dir: str = ""  # the routing dataset trained on
    backend: str = ""
    stats: dict[str, Any] = field(default_factory=dict)  # embed/train timings and counts


Backend = Callable[[RetrainRequest], Candidate]


# ---- the steps -------------------------------------------------------------------------------

def build_dataset(registry: Registry, options: TrainOptions, progress: Progress | None = None) -> Path:
    """Step 1: sample every adapter's dataset into a labelled routing dataset (:mod:`vlrouter.core.data`)."""
    return build_routing_dataset(registry, registry.resolve(options.datasets_dir), train_samples=options.train_samples,
                                 eval_samples=options.eval_samples, val_fraction=options.val_fraction,
                                 seed=options.seed, progress=progress)


def load_encoder(options: TrainOptions) -> Encoder:
    enc = Encoder.load(options.base_model, pooling=options.pooling, layer=options.layer, device=options.device,
                       dtype=options.dtype, revision=options.base_model_revision)
    set_prompt_token_limit(enc.processor, options.max_prompt_tokens)
    return enc


def check_work_dirs(registry: Registry, options: TrainOptions) -> None:
    """Before any work: the folders a run writes into (``train.datasets_dir``, ``train.cache_dir``) exist
    or can be made (a file standing there, or a read-only parent, is one located error), and a local
    ``base_model`` folder the run will load exists (never a Hub lookup for a missing folder)."""
    if options.base_model == registry.base_model:
        registry.check_base_model()
    for name in ("datasets_dir", "cache_dir"):
        ensure_dir(registry.resolve(getattr(options, name)), field=f"train.{name}", where=registry.path)


def check_labels(class_names: list[str], registry: Registry, where: str | Path) -> None:
    """A routing dataset (or a candidate) must be for the registry's adapters, in its order: a router for
    another label set would replace the live one, and route/act would then refuse it as stale."""
    if list(class_names) != registry.adapter_names:
        raise DatasetError(located(where, "class_names", f"built for adapters {list(class_names)}, but the "
                                   f"registry lists {registry.adapter_names}",
                                   fix="run `router build-dataset` for the current adapters (or `router retrain`)"))


def embed_splits(dataset_dir: str | Path, encoder: Encoder, cache_root: str | Path, *, workers: int = 1,
                 batch_size: int = 8, progress: Progress | None = None) -> SplitFeatures:
    """Step 2: features of every split (embedding only cache misses), in sample order."""
    ds = load_routing_dataset(dataset_dir)
    train_s, val_s = ds.split("train"), ds.split("val")
    eval_s = ds.split("eval") if ds.has_split("eval") else []
    if len({s.label for s in train_s + val_s}) < 2:
        raise TrainingError(located(ds.dir / "train.jsonl", None, "every sample has the same label; "
                                    "a router needs at least two adapters", fix="register another adapter"))
    info = encoder.info()
    feats, stats = embed_dataset(encoder, train_s + val_s + eval_s, FeatureCache(cache_root, info.fingerprint),
                                 workers=workers, batch_size=batch_size, progress=progress)
    check_features(feats, ds.dir)
    n_tr, n_va = len(train_s), len(val_s)
    return SplitFeatures(
        class_names=ds.class_names, encoder=info, train=feats[:n_tr], train_y=[s.label for s in train_s],
        val=feats[n_tr:n_tr + n_va], val_y=[s.label for s in val_s],
        eval=feats[n_tr + n_va:] if eval_s else None, eval_y=[s.label for s in eval_s], stats=stats)


def fit_candidate(dataset_dir: str | Path, features: SplitFeatures, options: TrainOptions, *, out_dir: str | Path,
                  registry_fingerprint: str | None = None, progress: Progress | None = None) -> Candidate:
    """Step 3: fit the head on features, calibrate its temperature, evaluate, write router.json + head.

    ``out_dir`` is a fresh folder (removed again if anything fails).
    """
    ds = load_routing_dataset(dataset_dir)
    names, enc, f = features.class_names, features.encoder, features
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        head, tstats = train_head(f.train, f.train_y, f.val, f.val_y, options, progress, num_labels=len(names),
                                  class_names=names, log_dir=out / "tensorboard")
        temperature = calibrate_temperature(head_logits(head, f.val), f.val_y)
        metrics = evaluate(head, f.val, f.val_y, class_names=names, temperature=temperature)
        metrics.update(val_acc=metrics["accuracy"], n_val=len(f.val_y), n_train=len(f.train_y))
        if f.eval is not None and len(f.eval_y):
            metrics["eval"] = evaluate(head, f.eval, f.eval_y, class_names=names, temperature=temperature)
        for key in ("best_step", "steps", "epochs_run", "stopped_early", "class_weights"):
            metrics[key] = tstats[key]
        metrics["dataset_dir"], metrics["seed"] = str(ds.dir), options.seed
        meta = RouterMeta(
            adapters=names, base_model=enc.base_model, pooling=enc.pooling, layer=enc.layer,
            hidden_size=enc.hidden_size,
            head=HeadShape(kind=options.head, in_dim=enc.hidden_size,
                           hidden=options.head_hidden if options.head == "mlp" else 0, num_labels=len(names)),
            temperature=temperature, best_loss=tstats["best_loss"], best_acc=tstats["best_acc"], metrics=metrics,
            registry_fingerprint=registry_fingerprint, label_fingerprint=fingerprint_labels(names),
            dataset_fingerprint=ds.fingerprint(), encoder_fingerprint=enc.fingerprint,
            embedded_new=int(f.stats.get("embedded_new", 0)), reused_cached=int(f.stats.get("reused_cached", 0)),
        )
        save_router(out, head, meta)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    train_stats = {k: v for k, v in tstats.items() if k != "history"}
    return Candidate(dir=out, dataset_dir=ds.dir, meta=meta, val_features=f.val, val_labels=list(f.val_y),
                     stats={"embed": dict(f.stats), "train": train_stats})


def train_candidate(dataset_dir: str | Path, registry: Registry, options: TrainOptions, *,
                    progress: Progress | None = None, encoder: Encoder | None = None) -> Candidate:
    """Steps 2 + 3 in this process: embed what is missing, then fit a candidate beside the live router."""
    ds = load_routing_dataset(dataset_dir)
    if ds.class_names != registry.adapter_names:
        progress_or_null(progress).log(f"note: routing dataset labels {ds.class_names} differ from the registry's "
                                       f"{registry.adapter_names}; the router follows the dataset")
    features = embed_splits(ds.dir, encoder if encoder is not None else load_encoder(options),
                            registry.resolve(options.cache_dir), workers=options.workers,
                            batch_size=options.embed_batch_size, progress=progress)
    return fit_candidate(ds.dir, features, options, out_dir=new_version_dir(registry.router_dir),
                         registry_fingerprint=registry.fingerprint(), progress=progress)


# ---- use-cases -------------------------------------------------------------------------------

def _finish(registry: Registry, cand: Candidate, options: TrainOptions, *, force: bool,
            progress: Progress | None, backend: str) -> RetrainResult:
    """Steps 4 + 5: the eval gate against the live router, then the atomic promotion.

    Whatever the backend, the candidate must be for the registry's adapters, and router.json
    records the base model as this machine sees it (an absolute folder or a hub id) with
    its weights fingerprint, so the router means the same from any working directory and
    goes stale when the weights change in place.
    """
    check_labels(cand.meta.adapters, registry, cand.dir / "router.json")
    stamp = {"base_model": options.base_model,
             "model_fingerprint": model_fingerprint(options.base_model, options.base_model_revision)}
    decision = promote_with_gate(cand.dir, registry.router_dir, val_feats=cand.val_features,
                                 val_labels=cand.val_labels, force=force, stamp=stamp)
    progress_or_null(progress).log(decision.message)
    meta = cand.meta
    return RetrainResult(router_dir=str(registry.router_dir), candidate_dir=str(cand.dir), promoted=decision.promoted,
                         adapters=list(meta.adapters), val_acc=meta.metrics["val_acc"],
                         live_val_acc=decision.live_val_acc, embedded_new=meta.embedded_new,
                         reused_cached=meta.reused_cached, message=decision.message, metrics=dict(meta.metrics),
                         dataset_dir=str(cand.dataset_dir), backend=backend, stats=cand.stats)


def run_retrain(registry: Registry, options: TrainOptions, backend: Backend, *, force: bool = False,
                progress: Progress | None = None) -> RetrainResult:
    """``router retrain``: ``backend`` builds, embeds and fits a candidate; then gate and promote here.

    Holds the router lock for the whole run (:class:`LockHeldError` if another run holds
    it). Never writes registry.yaml; ``registry`` may be an edited, unsaved one. Raises
    :class:`PromotionRefused` when the eval gate keeps the live router.
    """
    with RouterLock(registry.router_dir):
        check_work_dirs(registry, options)
        cand = backend(RetrainRequest(registry=registry, options=options, progress=progress))
        return _finish(registry, cand, options, force=force, progress=progress, backend=options.backend)


def run_train(registry: Registry, options: TrainOptions, *, dataset_dir: str | Path | None = None,
              force: bool = False, progress: Progress | None = None) -> RetrainResult:
    """``router train``: the recipe on an existing routing dataset (default: the newest), in this process.

    The dataset must be for the registry's adapters (:func:`check_labels`): an older one,
    built for other labels, is refused before anything is embedded.
    """
    with RouterLock(registry.router_dir):
        check_work_dirs(registry, options)
        ds = dataset_dir if dataset_dir is not None else newest_routing_dataset(registry.resolve(options.datasets_dir))
        loaded = load_routing_dataset(ds)
        check_labels(loaded.class_names, registry, loaded.dir / "metadata.json")
        cand = train_candidate(ds, registry, options, progress=progress)
        return _finish(registry, cand, options, force=force, progress=progress, backend="local")


def run_embed(registry: Registry, options: TrainOptions, *, dataset_dir: str | Path | None = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """``router embed``: features for every split of a routing dataset (default: the newest)."""
    check_work_dirs(registry, options)
    ds = load_routing_dataset(dataset_dir if dataset_dir is not None
                              else newest_routing_dataset(registry.resolve(options.datasets_dir)))
    samples = [s for split in SPLITS if ds.has_split(split) for s in ds.split(split)]
    enc = load_encoder(options)
    cache = FeatureCache(registry.resolve(options.cache_dir), enc.fingerprint())
    _, stats = embed_dataset(enc, samples, cache, workers=options.workers, batch_size=options.embed_batch_size,
                             progress=progress)
    return {**stats, "dataset_dir": str(ds.dir), "samples": len(samples), "cache_dir": str(cache.dir),
            "workers_chosen": options.workers, "workers_note": options.workers_note}


def evaluate_router(registry: Registry, options: TrainOptions, *, dataset_dir: str | Path | None = None,
                    split: str = "val", router_dir: str | Path | None = None,
                    progress: Progress | None = None) -> dict[str, Any]:
    """``router eval``: the live router's metrics on a routing dataset split (default: newest, val).

    Uses the router's own base model, pooling and layer (from router.json) and the
    feature cache; dataset labels map onto the router's by adapter name.
    """
    rdir = Path(router_dir) if router_dir is not None else registry.router_dir
    head, meta = load_router(rdir)
    ds = load_routing_dataset(dataset_dir if dataset_dir is not None
                              else newest_routing_dataset(registry.resolve(options.datasets_dir)))
    samples = ds.split(split)
    unknown = sorted({s.adapter for s in samples} - set(meta.adapters))
    if unknown:
        raise StaleRouterError(located(rdir / "router.json", "adapters",
                                       f"the router does not know {', '.join(unknown)} (router: {meta.adapters})",
                                       fix="run `router retrain`, or evaluate on a dataset built for this router"))
    check_work_dirs(registry, options)
    # The registry's base model (as this machine resolves it) when it is the router's; else the router's own.
    base = options.base_model if same_base_model(meta.base_model, registry, meta.model_fingerprint) \
        else meta.base_model
    enc = load_encoder(options.model_copy(update={"base_model": base, "pooling": meta.pooling,
                                                  "layer": meta.layer}))
    fp = enc.fingerprint()
    if meta.encoder_fingerprint and meta.encoder_fingerprint != fp:
        progress_or_null(progress).log(f"note: encoder fingerprint {fp} differs from training's "
                                       f"{meta.encoder_fingerprint} (other weights or settings)")
    feats, estats = embed_dataset(enc, samples, FeatureCache(registry.resolve(options.cache_dir), fp),
                                  workers=options.workers, batch_size=options.embed_batch_size, progress=progress)
    index = {n: i for i, n in enumerate(meta.adapters)}
    metrics = evaluate(head, feats, [index[s.adapter] for s in samples], class_names=list(meta.adapters),
                       temperature=meta.temperature)
    return {"metrics": metrics, "router_dir": str(rdir), "dataset_dir": str(ds.dir), "split": split,
            "embedded_new": estats["embedded_new"], "reused_cached": estats["reused_cached"]}


def edit_adapters(edited: Registry, *, backend: Backend | None, options: TrainOptions | None = None,
                  force: bool = False, progress: Progress | None = None) -> RetrainResult | None:
    """``add-adapter`` / ``remove-adapter``: retrain for the edited registry, then save it.

    ``edited`` is the in-memory registry after the edit. With a ``backend`` the router is
    retrained (and promoted) first; registry.yaml is written only after that succeeds, and
    only if nobody changed the file meanwhile (:meth:`Registry.save_if_unchanged`). With
    ``backend=None`` only registry.yaml is written (the router goes stale).
    """
    if backend is None:
        edited.save_if_unchanged()
        return None
    result = run_retrain(edited, options if options is not None else resolve_options(edited), backend, force=force,
                         progress=progress)
    edited.save_if_unchanged(retrained=True)
    return result
