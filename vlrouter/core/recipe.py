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
from vlrouter.core.errors import DatasetError, InputError, StaleRouterError, TrainingError, located
from vlrouter.core.features import FeatureCache, check_features, embed_dataset
from vlrouter.core.fit import train_head
from vlrouter.core.gate import promote_with_gate
from vlrouter.core.head import HeadShape, head_logits
from vlrouter.core.metrics import calibrate_temperature, evaluate
from vlrouter.core.ood import calibrate, fit_ood
from vlrouter.core.options import TrainOptions, resolve_options
from vlrouter.core.paths import ensure_dir
from vlrouter.core.progress import Progress, progress_or_null
from vlrouter.core.registry import Registry, fingerprint_labels
from vlrouter.core.selection import DEFAULT_L2, candidates, choose
from vlrouter.core.store import (
    RouterLock,
    RouterMeta,
    new_version_dir,
    read_meta,
    read_router,
    same_base_model,
    save_router,
)
from vlrouter.core.views import LAYOUT, default_layers, resolve_layer, view_key

if TYPE_CHECKING:
    pass


# ---- what flows between the steps --------------------------------------------------------------

@dataclass
class RetrainRequest:
    """What a backend gets: the registry to train for (possibly edited, unsaved) and resolved options."""

    registry: Registry
    options: TrainOptions
    progress: Progress | None = None


Views = dict  # {"view@layer": Tensor [N, H]}: every pooled view of a split (core.encoder.view_key)


@dataclass
class SplitFeatures:
    """Every pooled view of a routing dataset's splits, with the labels and the encoder they came from."""

    class_names: list[str]
    encoder: EncoderInfo
    layers: list[int]  # the hidden-state indices embedded
    train: Views
    train_y: list[int]
    val: Views
    val_y: list[int]
    eval: Views | None = None
    eval_y: list[int] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # embed stats: embedded_new, reused_cached, …

    def to_file(self, path: str | Path) -> Path:
        """One safetensors file (tensors + JSON metadata): how a remote backend hands features to its fit step."""
        import torch
        from safetensors.torch import save_file

        tensors = {"train_y": torch.tensor(self.train_y, dtype=torch.long),
                   "val_y": torch.tensor(self.val_y, dtype=torch.long)}
        parts = {"train": self.train, "val": self.val}
        if self.eval is not None:
            parts["eval"] = self.eval
            tensors["eval_y"] = torch.tensor(self.eval_y, dtype=torch.long)
        for split, views in parts.items():
            tensors.update({f"{split}/{name}": t.contiguous() for name, t in views.items()})
        meta = {"class_names": self.class_names, "encoder": asdict(self.encoder), "layers": self.layers,
                "stats": self.stats}
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

        def split(name: str) -> Views:
            return {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith(f"{name}/")}

        return cls(class_names=list(meta["class_names"]), encoder=EncoderInfo(**meta["encoder"]),
                   layers=list(meta["layers"]), train=split("train"), train_y=t["train_y"].tolist(),
                   val=split("val"), val_y=t["val_y"].tolist(), eval=split("eval") if "eval_y" in t else None,
                   eval_y=t["eval_y"].tolist() if "eval_y" in t else [], stats=meta["stats"])


@dataclass
class Candidate:
    """What a backend returns: a complete router in a fresh version folder, not yet promoted."""

    dir: Path
    dataset_dir: Path
    meta: RouterMeta
    val_views: Views  # for the gate: the live router is scored on the same samples, in its own representation
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
    representation: str = ""  # the views and layer the head reads, e.g. "image-grid+text-mean @ layer 2"
    solver: str = ""


Backend = Callable[[RetrainRequest], Candidate]


# ---- the steps -------------------------------------------------------------------------------

def build_dataset(registry: Registry, options: TrainOptions, progress: Progress | None = None) -> Path:
    """Step 1: sample every adapter's dataset into a labelled routing dataset (:mod:`vlrouter.core.data`)."""
    return build_routing_dataset(registry, registry.resolve(options.datasets_dir), train_samples=options.train_samples,
                                 eval_samples=options.eval_samples, val_fraction=options.val_fraction,
                                 seed=options.seed, progress=progress)


def load_encoder(options: TrainOptions) -> Encoder:
    enc = Encoder.load(options.base_model, device=options.device, dtype=options.dtype,
                       revision=options.base_model_revision)
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


def local_num_layers(base_model: str) -> int | None:
    """The decoder depth from a local model folder's config.json (no weights read); None for a hub id."""
    cfg = Path(base_model) / "config.json"
    try:
        data = json.loads(cfg.read_text())
        return int(data.get("text_config", data)["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_layer_setting(registry: Registry, options: TrainOptions) -> None:
    """Refuse an out-of-range ``router.layer`` before any work, when the model's depth can be read cheaply."""
    if options.layer == "auto":
        return
    n = local_num_layers(options.base_model)
    if n is None:
        return  # a hub id: checked once the model is loaded, before anything is embedded
    try:
        resolve_layer(int(options.layer), n)
    except InputError as e:
        raise InputError(located(registry.path, "router.layer", str(e).split("router.layer: ", 1)[-1],
                                 line=registry.line_of(("router", "layer")))) from None


def layers_to_embed(layer: str | int, num_layers: int, where: str | Path | None = None) -> list[int]:
    """Hidden-state indices to embed for the ``router.layer`` setting: the candidate layers for ``auto``;
    for a fixed layer, it and the candidate layers below it (free: the forward stops after it anyway)."""
    auto = default_layers(num_layers)
    if layer == "auto":
        return auto
    try:
        fixed = resolve_layer(int(layer), num_layers)
    except InputError as e:
        raise InputError(located(where, "router.layer", str(e).split("router.layer: ", 1)[-1])) from None
    return sorted({layer for layer in auto if layer <= fixed} | {fixed})


def embed_splits(dataset_dir: str | Path, encoder: Encoder, cache_root: str | Path, *, layers: list[int],
                 workers: int = 1, batch_size: int = 8, progress: Progress | None = None) -> SplitFeatures:
    """Step 2: every view at ``layers`` for every split (embedding only cache misses), in sample order."""
    ds = load_routing_dataset(dataset_dir)
    train_s, val_s = ds.split("train"), ds.split("val")
    eval_s = ds.split("eval") if ds.has_split("eval") else []
    if len({s.label for s in train_s + val_s}) < 2:
        raise TrainingError(located(ds.dir / "train.jsonl", None, "every sample has the same label; "
                                    "a router needs at least two adapters", fix="register another adapter"))
    info = encoder.info()
    views, stats = embed_dataset(encoder, train_s + val_s + eval_s, FeatureCache(cache_root, info.fingerprint),
                                 layers=layers, workers=workers, batch_size=batch_size, progress=progress)
    check_features(views, ds.dir)
    n_tr, n_va = len(train_s), len(val_s)

    def part(lo: int, hi: int) -> Views:
        return {name: t[lo:hi] for name, t in views.items()}

    return SplitFeatures(
        class_names=ds.class_names, encoder=info, layers=list(stats["layers"]), train=part(0, n_tr),
        train_y=[s.label for s in train_s], val=part(n_tr, n_tr + n_va), val_y=[s.label for s in val_s],
        eval=part(n_tr + n_va, n_tr + n_va + len(eval_s)) if eval_s else None,
        eval_y=[s.label for s in eval_s], stats=stats)


def fit_candidate(dataset_dir: str | Path, features: SplitFeatures, options: TrainOptions, *, out_dir: str | Path,
                  registry_fingerprint: str | None = None, progress: Progress | None = None) -> Candidate:
    """Step 3: choose the representation (CV on train), fit the head, calibrate temperature and the OOD
    threshold on val, evaluate, write router.json + head.safetensors into ``out_dir`` (removed on failure)."""
    import torch

    ds = load_routing_dataset(dataset_dir)
    names, enc, f = features.class_names, features.encoder, features
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        solver = options.solver if options.solver != "auto" else ("lbfgs" if options.head == "linear" else "adamw")
        progress_or_null(progress).log(f"head solver: {solver}" + (f" ({options.solver_reason})"
                                                                   if options.solver_reason else ""))
        layers = ([resolve_layer(int(options.layer), enc.num_layers)] if options.layer != "auto" else f.layers)
        y = torch.as_tensor(f.train_y)
        counts = torch.bincount(y, minlength=len(names))
        weights = counts.sum() / (len(names) * counts.float()) if bool(counts.max() != counts.min()) else None
        # lbfgs: l2 auto is tuned by CV; adamw: l2 only serves to compare representations
        given_l2 = None if options.l2 == "auto" else float(options.l2)
        sel = choose(f.train, f.train_y, candidates(options.pooling_views, layers), num_labels=len(names),
                     l2=given_l2 if solver == "lbfgs" else (given_l2 or DEFAULT_L2),
                     folds=options.cv_folds, seed=options.seed, weights=weights, progress=progress)
        rep = sel.representation
        tx, vx = rep.features(f.train), rep.features(f.val)
        head, tstats = train_head(tx, f.train_y, vx, f.val_y, options.model_copy(update={"solver": solver}),
                                  progress, num_labels=len(names), class_names=names, log_dir=out / "tensorboard",
                                  l2=sel.l2)
        # temperature: on the validation logits, and -- for the lbfgs head -- the training split's out-of-fold
        # logits from cross-validation too (several times the samples: a steadier estimate)
        cal_logits, cal_y = head_logits(head, vx), list(f.val_y)
        if solver == "lbfgs" and sel.oof_logits is not None:
            cal_logits, cal_y = torch.cat([cal_logits, sel.oof_logits]), cal_y + list(f.train_y)
        temperature = calibrate_temperature(cal_logits, cal_y)
        metrics = evaluate(head, vx, f.val_y, class_names=names, temperature=temperature)
        metrics.update(val_acc=metrics["accuracy"], n_val=len(f.val_y), n_train=len(f.train_y))
        ood = None
        if options.ood != "off":
            std, content, layout = head[0], view_key("image-std", rep.layer), view_key(LAYOUT, rep.layer)
            ood = calibrate(fit_ood(std(tx), f.train_y, len(names), f.train.get(layout)), std(vx), f.val[content],
                            f.train[content], val_layout=f.val.get(layout))
            val_scores = ood.score(std(vx), f.val[content], f.val.get(layout))
            metrics["val_known_rate"] = float((val_scores <= ood.threshold).double().mean())
        if f.eval is not None and len(f.eval_y):
            ex = rep.features(f.eval)
            metrics["eval"] = evaluate(head, ex, f.eval_y, class_names=names, temperature=temperature)
        for key in ("best_step", "steps", "epochs_run", "stopped_early", "class_weights"):
            metrics[key] = tstats[key]
        metrics["dataset_dir"], metrics["seed"] = str(ds.dir), options.seed
        meta = RouterMeta(
            adapters=names, base_model=enc.base_model, pooling=list(rep.views), layer=rep.layer,
            num_layers=enc.num_layers, hidden_size=enc.hidden_size,
            head=HeadShape(kind=options.head, in_dim=int(tx.shape[1]),
                           hidden=options.head_hidden if options.head == "mlp" else 0, num_labels=len(names)),
            temperature=temperature, best_loss=tstats["best_loss"], best_acc=tstats["best_acc"], metrics=metrics,
            solver=solver, l2=sel.l2 if solver == "lbfgs" else None, selection=sel.to_dict(),
            registry_fingerprint=registry_fingerprint, label_fingerprint=fingerprint_labels(names),
            dataset_fingerprint=ds.fingerprint(), encoder_fingerprint=enc.fingerprint,
            embedded_new=int(f.stats.get("embedded_new", 0)), reused_cached=int(f.stats.get("reused_cached", 0)),
        )
        save_router(out, head, meta, ood=ood)
        meta = read_meta(out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    train_stats = {k: v for k, v in tstats.items() if k != "history"}
    return Candidate(dir=out, dataset_dir=ds.dir, meta=meta, val_views=f.val, val_labels=list(f.val_y),
                     stats={"embed": dict(f.stats), "train": train_stats, "selection": sel.to_dict()})


def train_candidate(dataset_dir: str | Path, registry: Registry, options: TrainOptions, *,
                    progress: Progress | None = None, encoder: Encoder | None = None) -> Candidate:
    """Steps 2 + 3 in this process: embed what is missing, then fit a candidate beside the live router."""
    ds = load_routing_dataset(dataset_dir)
    if ds.class_names != registry.adapter_names:
        progress_or_null(progress).log(f"note: routing dataset labels {ds.class_names} differ from the registry's "
                                       f"{registry.adapter_names}; the router follows the dataset")
    enc = encoder if encoder is not None else load_encoder(options)
    features = embed_splits(ds.dir, enc, registry.resolve(options.cache_dir),
                            layers=layers_to_embed(options.layer, enc.num_layers, registry.path),
                            workers=options.workers, batch_size=options.embed_batch_size, progress=progress)
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
    decision = promote_with_gate(cand.dir, registry.router_dir, val_views=cand.val_views,
                                 val_labels=cand.val_labels, force=force, stamp=stamp)
    progress_or_null(progress).log(decision.message)
    meta = cand.meta
    return RetrainResult(router_dir=str(registry.router_dir), candidate_dir=str(cand.dir), promoted=decision.promoted,
                         adapters=list(meta.adapters), val_acc=meta.metrics["val_acc"],
                         live_val_acc=decision.live_val_acc, embedded_new=meta.embedded_new,
                         reused_cached=meta.reused_cached, message=decision.message, metrics=dict(meta.metrics),
                         dataset_dir=str(cand.dataset_dir), backend=backend, stats=cand.stats,
                         representation=meta.representation().label, solver=meta.solver or "")


def run_retrain(registry: Registry, options: TrainOptions, backend: Backend, *, force: bool = False,
                progress: Progress | None = None) -> RetrainResult:
    """``router retrain``: ``backend`` builds, embeds and fits a candidate; then gate and promote here.

    Holds the router lock for the whole run (:class:`LockHeldError` if another run holds
    it). Never writes registry.yaml; ``registry`` may be an edited, unsaved one. Raises
    :class:`PromotionRefused` when the eval gate keeps the live router.
    """
    check_layer_setting(registry, options)
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
    check_layer_setting(registry, options)
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
    _, stats = embed_dataset(enc, samples, cache, layers=layers_to_embed(options.layer, enc.num_layers, registry.path),
                             workers=options.workers, batch_size=options.embed_batch_size, progress=progress)
    return {**stats, "dataset_dir": str(ds.dir), "samples": len(samples), "cache_dir": str(cache.dir),
            "workers_chosen": options.workers, "workers_note": options.workers_note}


def evaluate_router(registry: Registry, options: TrainOptions, *, dataset_dir: str | Path | None = None,
                    split: str = "val", router_dir: str | Path | None = None,
                    progress: Progress | None = None) -> dict[str, Any]:
    """``router eval``: the live router's metrics on a routing dataset split (default: newest, val).

    Uses the router's own base model and representation (router.json) and the feature
    cache; dataset labels map onto the router's by adapter name. ``samples`` lists every
    sample with its true and routed adapter, probabilities and OOD score (for the report).
    """
    import torch

    rdir = Path(router_dir) if router_dir is not None else registry.router_dir
    router = read_router(rdir)
    meta = router.meta
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
    enc = load_encoder(options.model_copy(update={"base_model": base}))
    fp = enc.fingerprint()
    if meta.encoder_fingerprint and meta.encoder_fingerprint != fp:
        progress_or_null(progress).log(f"note: encoder fingerprint {fp} differs from training's "
                                       f"{meta.encoder_fingerprint} (other weights or settings)")
    rep = meta.model_copy(update={"num_layers": meta.num_layers or enc.num_layers}).representation()
    views, estats = embed_dataset(enc, samples, FeatureCache(registry.resolve(options.cache_dir), fp),
                                  layers=[rep.layer], workers=options.workers, batch_size=options.embed_batch_size,
                                  progress=progress)
    feats = rep.features(views)
    index = {n: i for i, n in enumerate(meta.adapters)}
    labels = [index[s.adapter] for s in samples]
    metrics = evaluate(router.head, feats, labels, class_names=list(meta.adapters), temperature=meta.temperature)
    probs = torch.softmax(head_logits(router.head, feats).double() / meta.temperature, dim=-1)
    content, layout = views.get(view_key("image-std", rep.layer)), views.get(view_key(LAYOUT, rep.layer))
    scores = router.ood.score(router.head[0](feats), content, layout) if router.ood is not None else None
    rows = []
    for i, s in enumerate(samples):
        p = probs[i].tolist()
        rows.append({"id": s.id, "image": s.image, "prompt": s.prompt, "adapter": s.adapter,
                     "routed": meta.adapters[max(range(len(p)), key=p.__getitem__)],
                     "probs": dict(zip(meta.adapters, p)),
                     "ood_score": float(scores[i]) if scores is not None else None,
                     "known": bool(scores[i] <= router.ood.threshold) if scores is not None else True})
    return {"metrics": metrics, "router_dir": str(rdir), "dataset_dir": str(ds.dir), "split": split,
            "representation": rep.label, "pooling": list(meta.pooling), "layer": rep.layer,
            "selection": meta.selection, "samples": rows,
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
