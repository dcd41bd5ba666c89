"""Head training on cached features, metrics, temperature calibration, the eval gate, retrain.

The pipeline is a chain of plain functions that run the same in this process (the
``local`` backend) and inside a remote container (the ``modal`` backend)::

    resolve_options(registry, overrides)                      defaults < registry.yaml < flags
    data.build_routing_dataset(registry, out_root, ...)       -> routing_YYYYMMDD_HHMMSS/
    features.embed_dataset(encoder, samples, cache, ...)      -> features [N, H], stats
    train_head(train_x, train_y, val_x, val_y, options)       -> head, stats
    calibrate_temperature(val_logits, val_y)                  -> T
    evaluate(head, x, y, class_names=..., temperature=T)      -> metrics
    write_candidate(live_dir, head, meta)                     -> a new version folder
    promote_with_gate(candidate_dir, live_dir, force)         -> promoted, or PromotionRefused

:func:`train_on_dataset` runs embed → train → calibrate → evaluate → write for one
routing dataset; :func:`retrain_local` adds the dataset build; :func:`run_retrain` takes
the lock, picks the backend and applies the gate (shared by every backend). Nothing
here writes registry.yaml: ``router add-adapter`` saves it only after a retrain succeeds.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from vlrouter.core.errors import (
    BackendError,
    CheckpointError,
    InputError,
    LockHeldError,
    PromotionRefused,
    TrainingError,
    located,
)
from vlrouter.core.progress import Progress, progress_or_null
from vlrouter.core.registry import TrainSection, fingerprint_labels

if TYPE_CHECKING:
    import torch

    from vlrouter.backends.base import RetrainRequest, RetrainResult
    from vlrouter.core.encoder import Encoder
    from vlrouter.core.registry import Registry

ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)  # a tiny val split must not push T to 0 or infinity
PLOT_FILE = "confusion.png"


# ---- options: defaults < registry.yaml train: < CLI flags, in one place ---------------------

class TrainOptions(TrainSection):
    """``train:`` of registry.yaml with CLI overrides applied, plus what the encoder needs."""

    base_model: str
    base_model_revision: str | None = None
    pooling: str = "mean"
    layer: int = -1
    dtype: str = "auto"
    device: str | None = None
    gpu: str | None = None  # Modal GPU type for --backend modal (else registry.yaml modal.gpu)


OVERRIDE_ALIASES = {"base_model_id": "base_model"}


def resolve_options(registry: Registry, overrides: dict[str, Any] | None = None) -> TrainOptions:
    """The one place options resolve: built-in defaults < ``registry.yaml`` ``train:`` < ``overrides``.

    ``overrides`` holds CLI flags by field name (``epochs``, ``batch_size``, ``lr``,
    ``patience``, ``train_samples``, ``eval_samples``, ``backend``, ``device``, …);
    ``None`` values mean "not given". ``base_model_id`` (the seed's flag) replaces the
    registry's ``base_model``; an existing local folder is made absolute.
    """
    m = registry.model
    values: dict[str, Any] = m.train.model_dump()
    values.update(base_model=registry.base_model, base_model_revision=m.base_model_revision,
                  pooling=m.router.pooling, layer=m.router.layer, dtype=m.router.dtype)
    known = set(TrainOptions.model_fields)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        field = OVERRIDE_ALIASES.get(key, key)
        if field not in known:
            raise InputError(f"unknown training option {key!r} (fix: one of {', '.join(sorted(known))})")
        if field == "base_model" and os.path.exists(os.path.expanduser(str(value))):
            value = os.path.abspath(os.path.expanduser(str(value)))
        values[field] = value
    try:
        return TrainOptions.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(x) for x in err["loc"])
        flag = "--" + name.replace("_", "-")
        raise InputError(located(None, name, f"{err['msg']} (got {values.get(name)!r})",
                                 fix=f"correct {flag} or train.{name} in registry.yaml")) from None


def load_encoder(options: TrainOptions) -> Encoder:
    from vlrouter.core.encoder import Encoder

    return Encoder.load(options.base_model, pooling=options.pooling, layer=options.layer, device=options.device,
                        dtype=options.dtype, revision=options.base_model_revision)


# ---- head training --------------------------------------------------------------------------

@contextmanager
def one_thread():
    """Run torch on one CPU thread inside the block.

    Head training and calibration work on tiny tensors, where a step costs thread
    synchronisation rather than FLOPs; one fixed thread is faster, and it keeps float
    reductions -- and so the trained weights -- identical across machines.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _as_labels(y) -> torch.Tensor:
    import torch

    return torch.as_tensor(y, dtype=torch.long).reshape(-1)


def train_head(train_feats: torch.Tensor, train_labels, val_feats: torch.Tensor, val_labels,
               options: TrainSection, progress: Progress | None = None, *, num_labels: int | None = None,
               class_names: list[str] | None = None, log_dir: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """Train the router head (fp32) on pooled features; return ``(head, stats)``.

    AdamW; ReduceLROnPlateau on validation loss; evaluation every ``eval_every`` steps
    (and after the last step); early stopping after ``patience`` evaluations without a
    lower validation loss; at most ``epochs`` epochs; no label smoothing; inverse-
    frequency class weights when the training classes are imbalanced. The weights of
    the best evaluation are returned. Seeded by ``options.seed`` without touching the
    global RNG: the same features and seed give identical weights on CPU. With
    ``log_dir``, TensorBoard scalars go there. Runs on the CPU with one thread
    (:func:`one_thread`).
    """
    import torch

    from vlrouter.core.head import HeadShape

    prog = progress_or_null(progress)
    x, y = train_feats.float(), _as_labels(train_labels)
    vx, vy = val_feats.float(), _as_labels(val_labels)
    if x.ndim != 2 or x.shape[0] == 0:
        raise TrainingError("no training features (fix: the routing dataset's train split is empty)")
    if vx.ndim != 2 or vx.shape[0] == 0:
        raise TrainingError("no validation features (fix: the routing dataset's val split is empty)")
    if x.shape[0] != y.shape[0] or vx.shape[0] != vy.shape[0] or x.shape[1] != vx.shape[1]:
        raise TrainingError(f"feature/label shapes disagree: train {tuple(x.shape)} / {tuple(y.shape)}, "
                            f"val {tuple(vx.shape)} / {tuple(vy.shape)}")
    k = num_labels or int(max(y.max(), vy.max())) + 1
    names = class_names or [str(i) for i in range(k)]
    if int(max(y.max(), vy.max())) >= k or int(min(y.min(), vy.min())) < 0:
        raise TrainingError(f"labels must lie in 0..{k - 1}")
    counts = torch.bincount(y, minlength=k)
    if k < 2:
        raise TrainingError("a router needs at least two labels (fix: register another adapter)")
    if (counts == 0).any():
        empty = [names[i] for i in range(k) if counts[i] == 0]
        raise TrainingError(f"no training samples for {', '.join(empty)} (fix: add samples to its dataset)")
    imbalanced = bool(counts.max() != counts.min())
    weights = (counts.sum() / (k * counts.float())) if imbalanced else None

    bs = options.batch_size
    steps_per_epoch = math.ceil(x.shape[0] / bs)
    hidden = options.head_hidden if options.head == "mlp" else 0
    shape = HeadShape(kind=options.head, in_dim=int(x.shape[1]), hidden=hidden, num_labels=k)
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(log_dir))
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    try:
        with one_thread():
            head, best_loss, best_acc, best_step, step, stopped_early = _fit(
                x, y, vx, vy, options, shape, weights, writer, history, prog, steps_per_epoch)
    finally:
        if writer is not None:
            writer.flush()
            writer.close()
    stats = {
        "best_loss": best_loss, "best_acc": best_acc, "best_step": best_step, "steps": step,
        "epochs_run": round(step / steps_per_epoch, 2), "stopped_early": stopped_early,
        "class_weights": [round(float(w), 4) for w in weights] if weights is not None else None,
        "n_train": int(x.shape[0]), "n_val": int(vx.shape[0]), "seconds": round(time.perf_counter() - t0, 3),
        "samples_per_s": round(step * bs / max(time.perf_counter() - t0, 1e-9), 1), "history": history,
    }
    prog.log(f"head: best val loss {best_loss:.4f}, val acc {best_acc:.3f} at step {best_step} of {step}"
             + (" (early stop)" if stopped_early else ""))
    return head, stats


def _fit(x, y, vx, vy, options, shape, weights, writer, history, prog, steps_per_epoch):
    """The training loop of :func:`train_head` (seeded, on a forked RNG)."""
    import torch
    from torch import nn

    from vlrouter.core.head import build_head

    bs, epochs = options.batch_size, options.epochs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        head = build_head(shape)
        head[0].fit(x)
        gen = torch.Generator().manual_seed(options.seed)
        loss_fn = nn.CrossEntropyLoss(weight=weights)  # no label smoothing: a handful of classes
        opt = torch.optim.AdamW(head.parameters(), lr=options.lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5,
                                                           patience=max(1, options.patience // 2))
        best_loss, best_acc, best_step = math.inf, 0.0, 0
        best_state = {n: t.detach().clone() for n, t in head.state_dict().items()}
        step, since_best, stopped_early, last_eval = 0, 0, False, -1

        def run_eval() -> bool:
            nonlocal best_loss, best_acc, best_step, best_state, since_best, last_eval
            head.eval()
            with torch.no_grad():
                logits = head(vx)
                vloss = float(nn.functional.cross_entropy(logits, vy))
                vacc = float((logits.argmax(1) == vy).float().mean())
            head.train()
            last_eval = step
            lr_now = opt.param_groups[0]["lr"]
            history.append({"step": step, "val_loss": vloss, "val_acc": vacc, "lr": lr_now})
            if writer is not None:
                writer.add_scalar("val/loss", vloss, step)
                writer.add_scalar("val/acc", vacc, step)
                writer.add_scalar("train/lr", lr_now, step)
            sched.step(vloss)
            if vloss < best_loss - 1e-7:
                best_loss, best_acc, best_step, since_best = vloss, vacc, step, 0
                best_state = {n: t.detach().clone() for n, t in head.state_dict().items()}
                return False
            since_best += 1
            return since_best >= options.patience

        head.train()
        with prog.task("training head", total=epochs * steps_per_epoch) as task:
            for _epoch in range(epochs):
                perm = torch.randperm(x.shape[0], generator=gen)
                for i in range(0, x.shape[0], bs):
                    idx = perm[i:i + bs]
                    loss = loss_fn(head(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    task.advance()
                    if writer is not None:
                        writer.add_scalar("train/loss", loss.item(), step)
                    if step % options.eval_every == 0 and run_eval():
                        stopped_early = True
                        break
                if stopped_early:
                    break
            if last_eval != step:
                run_eval()
    head.load_state_dict(best_state)
    head.eval()
    return head, best_loss, best_acc, best_step, step, stopped_early


def head_logits(head, feats: torch.Tensor) -> torch.Tensor:
    import torch

    head.eval()
    with torch.no_grad():
        return head(feats.float())


# ---- calibration and metrics ----------------------------------------------------------------

def calibrate_temperature(logits: torch.Tensor, labels) -> float:
    """The softmax temperature minimising validation NLL (grid over log T, then refined).

    Bounded to :data:`TEMPERATURE_RANGE`: on a small, perfectly separated val split the
    unbounded optimum is T -> 0, which would make every routing decision look certain.
    """
    import torch

    z = logits.double()
    y = _as_labels(labels)
    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / math.exp(log_t), y))

    with one_thread():
        grid = [lo + (hi - lo) * i / 200 for i in range(201)]
        vals = [nll(g) for g in grid]
        i = min(range(len(grid)), key=lambda j: (vals[j], abs(grid[j])))
        a, b = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
        for _ in range(40):  # golden-section refinement inside the bracketing cell
            m1, m2 = a + (b - a) * 0.382, a + (b - a) * 0.618
            if nll(m1) <= nll(m2):
                b = m2
            else:
                a = m1
        best = (a + b) / 2
        if nll(best) > vals[i]:
            best = grid[i]
    return round(math.exp(best), 6)


def expected_calibration_error(probs: torch.Tensor, labels, bins: int = ECE_BINS) -> float:
    """ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by count."""
    import torch

    y = _as_labels(labels)
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    ece = 0.0
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    conf = conf.double()
    for b in range(bins):
        sel = (conf > edges[b]) & (conf <= edges[b + 1]) if b else (conf >= edges[0]) & (conf <= edges[1])
        if sel.any():
            ece += float(sel.double().mean()) * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return ece


def classification_metrics(pred, labels, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix (rows = true)."""
    import torch

    p, y = _as_labels(pred), _as_labels(labels)
    k = len(class_names)
    conf = torch.zeros(k, k, dtype=torch.long)
    for t, q in zip(y.tolist(), p.tolist()):
        conf[t, q] += 1
    per = {}
    for i, name in enumerate(class_names):
        tp = int(conf[i, i])
        pred_n, true_n = int(conf[:, i].sum()), int(conf[i].sum())
        prec = tp / pred_n if pred_n else 0.0
        rec = tp / true_n if true_n else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per[name] = {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4), "support": true_n}
    n = int(y.numel())
    acc = float((p == y).float().mean()) if n else 0.0
    return {"n": n, "accuracy": acc, "per_class": per, "confusion": conf.tolist(), "class_names": list(class_names)}


def evaluate(head, feats: torch.Tensor, labels, *, class_names: list[str], temperature: float = 1.0) -> dict[str, Any]:
    """Metrics of ``head`` on ``feats``: accuracy, per-class P/R/F1, confusion, NLL and ECE
    before (T=1) and after temperature scaling."""
    import torch

    y = _as_labels(labels)
    logits = head_logits(head, feats).double()
    out = classification_metrics(logits.argmax(1), y, class_names)
    if y.numel():
        out["nll"] = float(torch.nn.functional.cross_entropy(logits, y))
        out["nll_calibrated"] = float(torch.nn.functional.cross_entropy(logits / temperature, y))
        out["ece"] = expected_calibration_error(torch.softmax(logits, 1), y)
        out["ece_calibrated"] = expected_calibration_error(torch.softmax(logits / temperature, 1), y)
    out["temperature"] = temperature
    return out


def plot_confusion(metrics: dict[str, Any], path: str | Path, *, title: str = "router confusion matrix") -> Path:
    """Write the confusion matrix of :func:`evaluate`'s metrics as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = metrics["class_names"]
    conf = metrics["confusion"]
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.1 * k + 2))
    try:
        im = ax.imshow(conf, cmap="Blues")
        ax.set_xticks(range(k), labels=names, rotation=35, ha="right")
        ax.set_yticks(range(k), labels=names)
        ax.set_xlabel("predicted adapter")
        ax.set_ylabel("true adapter")
        top = max((max(r) for r in conf), default=0)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(conf[i][j]), ha="center", va="center",
                        color="white" if conf[i][j] > top / 2 else "black")
        ax.set_title(f"{title}\naccuracy {metrics['accuracy']:.3f} on {metrics['n']} samples")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out


# ---- one routing dataset -> a candidate router ----------------------------------------------

def write_candidate(live_dir: str | Path, head, meta, *, candidate_dir: str | Path | None = None) -> Path:
    """Write ``head.safetensors`` + ``router.json`` into a fresh version folder beside the live router."""
    from vlrouter.core.head import new_version_dir, save_router

    out = Path(candidate_dir) if candidate_dir is not None else new_version_dir(live_dir)
    return save_router(out, head, meta)


def live_accuracy(live_dir: str | Path, class_names: list[str], encoder_fp: str, val_feats,
                  val_labels) -> dict | None:
    """The live router's accuracy on these validation features, when it is comparable.

    ``None`` without a (loadable) live router; ``{"comparable": False, ...}`` when its labels
    or encoder differ; else ``{"comparable": True, "acc": ..., "version": <real path>}``.
    """
    live_dir = Path(live_dir)
    from vlrouter.core.head import load_router, read_meta

    if not (live_dir / "router.json").is_file():
        return None
    try:
        meta = read_meta(live_dir)
        if list(meta.adapters) != list(class_names) or meta.encoder_fingerprint != encoder_fp:
            return {"comparable": False, "adapters": list(meta.adapters)}
        head, _ = load_router(live_dir)
        acc = float((head_logits(head, val_feats).argmax(1) == _as_labels(val_labels)).float().mean())
    except (CheckpointError, RuntimeError):
        return None
    return {"comparable": True, "acc": acc, "version": os.path.realpath(live_dir)}


def train_on_dataset(dataset_dir: str | Path, options: TrainOptions, *, live_dir: str | Path,
                     cache_root: str | Path, registry_fingerprint: str | None = None, encoder: Encoder | None = None,
                     progress: Progress | None = None, candidate_dir: str | Path | None = None,
                     expected_labels: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Embed (cache misses only) → train → calibrate → evaluate → write a candidate router.

    Returns ``(candidate_dir, stats)``; the candidate is not promoted. When the live
    router has the same labels and encoder fingerprint, its accuracy on the same
    validation features goes into ``metrics.live_val_acc`` for :func:`promote_with_gate`.
    """
    from vlrouter.core.data import load_routing_dataset
    from vlrouter.core.features import FeatureCache, check_features, embed_dataset
    from vlrouter.core.head import HeadShape, RouterMeta, new_version_dir

    prog = progress_or_null(progress)
    live = Path(live_dir)
    ds = load_routing_dataset(dataset_dir)
    names = ds.class_names
    if expected_labels is not None and list(expected_labels) != names:
        prog.log(f"note: routing dataset labels {names} differ from the registry's {list(expected_labels)}; "
                 "the router follows the dataset")
    train_s, val_s = ds.split("train"), ds.split("val")
    eval_s = ds.split("eval") if ds.has_split("eval") else []
    if len({s.label for s in train_s + val_s}) < 2:
        raise TrainingError(located(ds.dir / "train.jsonl", None, "every sample has the same label; "
                                    "a router needs at least two adapters", fix="register another adapter"))
    enc = encoder if encoder is not None else load_encoder(options)
    fp = enc.fingerprint()
    cache = FeatureCache(cache_root, fp)
    feats, estats = embed_dataset(enc, train_s + val_s + eval_s, cache, workers=options.workers,
                                  batch_size=options.embed_batch_size, progress=progress)
    check_features(feats, ds.dir)
    n_tr, n_va = len(train_s), len(val_s)
    tx, vx, ex = feats[:n_tr], feats[n_tr:n_tr + n_va], feats[n_tr + n_va:]
    ty, vy, ey = ([s.label for s in part] for part in (train_s, val_s, eval_s))

    cand = Path(candidate_dir) if candidate_dir is not None else new_version_dir(live)
    cand.mkdir(parents=True, exist_ok=True)
    try:
        head, tstats = train_head(tx, ty, vx, vy, options, progress, num_labels=len(names), class_names=names,
                                  log_dir=cand / "tensorboard")
        temperature = calibrate_temperature(head_logits(head, vx), vy)
        metrics = evaluate(head, vx, vy, class_names=names, temperature=temperature)
        metrics["val_acc"] = metrics["accuracy"]
        metrics["n_val"], metrics["n_train"] = n_va, n_tr
        if eval_s:
            metrics["eval"] = evaluate(head, ex, ey, class_names=names, temperature=temperature)
        live_info = live_accuracy(live, names, fp, vx, vy)
        if live_info and live_info.get("comparable"):
            metrics["live_val_acc"] = live_info["acc"]
            metrics["live_version"] = live_info["version"]
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
            dataset_fingerprint=ds.fingerprint(), encoder_fingerprint=fp,
            embedded_new=estats["embedded_new"], reused_cached=estats["reused_cached"],
        )
        write_candidate(live, head, meta, candidate_dir=cand)
    except BaseException:
        shutil.rmtree(cand, ignore_errors=True)
        raise
    stats = {"candidate_dir": str(cand), "dataset_dir": str(ds.dir), "adapters": names,
             "val_acc": metrics["val_acc"], "live_val_acc": metrics.get("live_val_acc"),
             "embedded_new": estats["embedded_new"], "reused_cached": estats["reused_cached"],
             "embed": estats, "train": {k: v for k, v in tstats.items() if k != "history"}, "metrics": metrics,
             "temperature": temperature}
    return cand, stats


_live_accuracy = live_accuracy  # the name the Modal driver first imported


# ---- the eval gate and promotion (shared by every backend) ----------------------------------

@dataclass
class GateDecision:
    promoted: bool
    message: str
    val_acc: float | None
    live_val_acc: float | None
    n_val: int | None


def promote_with_gate(candidate_dir: str | Path, live_dir: str | Path, force: bool = False) -> GateDecision:
    """Promote the candidate unless it scored below the live router on the same validation samples.

    Comparable = the live router has the candidate's label list and encoder fingerprint,
    and the candidate's ``metrics.live_val_acc`` was measured against that live version.
    Below it and not ``force``: :class:`PromotionRefused` with both numbers; the live
    router is left untouched and the candidate stays in its version folder.
    """
    from vlrouter.core.head import promote, read_meta

    cand, live = Path(candidate_dir), Path(live_dir)
    meta = read_meta(cand)
    val_acc = meta.metrics.get("val_acc")
    live_acc = meta.metrics.get("live_val_acc")
    n_val = meta.metrics.get("n_val")
    note = "no live router"
    comparable = False
    if (live / "router.json").is_file():
        try:
            live_meta = read_meta(live)
        except CheckpointError:
            live_meta, note = None, "the live router does not load"
        if live_meta is not None:
            if list(live_meta.adapters) != list(meta.adapters):
                note = f"the live router has other labels ({', '.join(live_meta.adapters)})"
            elif live_meta.encoder_fingerprint != meta.encoder_fingerprint:
                note = "the live router used another encoder"
            elif live_acc is None or meta.metrics.get("live_version") not in (None, os.path.realpath(live)):
                note = "no accuracy of the live router on these samples"
            else:
                comparable = True
    fmt = lambda a: f"{a:.3f}" if isinstance(a, (int, float)) else "n/a"  # noqa: E731
    if comparable and val_acc is not None and val_acc < live_acc:
        if not force:
            err = PromotionRefused(
                f"new router {fmt(val_acc)} < live {fmt(live_acc)} on the same {n_val} validation samples; "
                f"kept the live router, candidate left in {cand} (fix: --force to promote anyway)")
            err.candidate_dir, err.val_acc, err.live_val_acc = str(cand), val_acc, live_acc
            raise err
        promote(cand, live)
        return GateDecision(True, f"promoted by --force: new {fmt(val_acc)} < live {fmt(live_acc)} on the same "
                            f"{n_val} validation samples", val_acc, live_acc, n_val)
    promote(cand, live)
    if comparable:
        msg = f"promoted: new {fmt(val_acc)} >= live {fmt(live_acc)} on the same {n_val} validation samples"
    else:
        msg = f"promoted: val acc {fmt(val_acc)} ({note})"
    return GateDecision(True, msg, val_acc, live_acc if comparable else None, n_val)


# ---- retrain: lock, backend, gate -----------------------------------------------------------

def lock_path(registry: Registry) -> Path:
    return Path(str(registry.router_dir) + ".lock")


class RouterLock:
    """``filelock.FileLock`` on ``<router dir>.lock``, never waiting: a held lock is an error."""

    def __init__(self, registry: Registry) -> None:
        from filelock import FileLock

        self.path = lock_path(registry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path), timeout=0)

    def __enter__(self) -> RouterLock:
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            raise LockHeldError(located(self.path, None, f"another retrain holds the lock {self.path}",
                                        fix="wait for it to finish (the lock frees itself when that process exits)")
                                ) from None
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


def _result(registry: Registry, cand: Path, stats: dict[str, Any], backend: str) -> RetrainResult:
    from vlrouter.backends.base import RetrainResult

    return RetrainResult(router_dir=str(registry.router_dir), candidate_dir=str(cand), promoted=False,
                         adapters=list(stats["adapters"]), val_acc=stats["val_acc"],
                         live_val_acc=stats.get("live_val_acc"), embedded_new=stats["embedded_new"],
                         reused_cached=stats["reused_cached"], metrics=stats["metrics"],
                         dataset_dir=stats["dataset_dir"], backend=backend, stats=stats)


def retrain_local(request: RetrainRequest) -> RetrainResult:
    """The local backend: build the routing dataset, then :func:`train_on_dataset`, in this process."""
    from vlrouter.core.data import build_routing_dataset

    reg = request.registry
    opts = request.options if request.options is not None else resolve_options(reg, request.overrides)
    ds = build_routing_dataset(reg, reg.resolve(opts.datasets_dir), train_samples=opts.train_samples,
                               eval_samples=opts.eval_samples, val_fraction=opts.val_fraction, seed=opts.seed,
                               progress=request.progress)
    cand, stats = train_on_dataset(ds, opts, live_dir=reg.router_dir, cache_root=reg.resolve(opts.cache_dir),
                                   registry_fingerprint=reg.fingerprint(), progress=request.progress,
                                   expected_labels=reg.adapter_names)
    return _result(reg, cand, stats, "local")


def get_backend(registry: Registry, name: str):
    from vlrouter.core.registry import suggest
    from vlrouter.plugins.manager import collect_backends, get_plugin_manager

    backends = collect_backends(get_plugin_manager(registry))
    if name not in backends:
        raise BackendError(f"unknown training backend {name!r}{suggest(name, list(backends))} "
                           f"(fix: one of {', '.join(sorted(backends))}; set train.backend or --backend)")
    return backends[name]


def run_retrain(registry: Registry, *, overrides: dict[str, Any] | None = None, force: bool = False,
                progress: Progress | None = None, backend: str | None = None) -> RetrainResult:
    """Build dataset → embed → train → evaluate on ``backend``, then gate and promote.

    Holds the router lock for the whole run (:class:`LockHeldError` if another run
    holds it). Never writes registry.yaml; ``registry`` may be an unsaved, edited one.
    Raises :class:`PromotionRefused` when the eval gate keeps the live router.
    """
    from vlrouter.backends.base import RetrainRequest

    with RouterLock(registry):
        opts = resolve_options(registry, {**(overrides or {}), **({"backend": backend} if backend else {})})
        impl = get_backend(registry, opts.backend)
        request = RetrainRequest(registry=registry, overrides=dict(overrides or {}), force=force, progress=progress,
                                 options=opts)
        result = impl.retrain(request)
        decision = promote_with_gate(result.candidate_dir, registry.router_dir, force)
        progress_or_null(progress).log(decision.message)
        return replace(result, promoted=decision.promoted, message=decision.message,
                       live_val_acc=decision.live_val_acc)


def run_train(registry: Registry, *, dataset_dir: str | Path | None = None, overrides: dict[str, Any] | None = None,
              force: bool = False, progress: Progress | None = None) -> RetrainResult:
    """``router train``: head on (cached) features of a routing dataset (default: newest), gate, promote."""
    from vlrouter.core.data import newest_routing_dataset

    with RouterLock(registry):
        opts = resolve_options(registry, overrides)
        ds = (Path(dataset_dir) if dataset_dir is not None
              else newest_routing_dataset(registry.resolve(opts.datasets_dir)))
        cand, stats = train_on_dataset(ds, opts, live_dir=registry.router_dir,
                                       cache_root=registry.resolve(opts.cache_dir),
                                       registry_fingerprint=registry.fingerprint(), progress=progress,
                                       expected_labels=registry.adapter_names)
        result = _result(registry, cand, stats, "local")
        decision = promote_with_gate(cand, registry.router_dir, force)
        progress_or_null(progress).log(decision.message)
        return replace(result, promoted=decision.promoted, message=decision.message,
                       live_val_acc=decision.live_val_acc)


def run_embed(registry: Registry, *, dataset_dir: str | Path | None = None, overrides: dict[str, Any] | None = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """``router embed``: features for every split of a routing dataset (default: newest)."""
    from vlrouter.core.data import SPLITS, load_routing_dataset, newest_routing_dataset
    from vlrouter.core.features import FeatureCache, embed_dataset

    opts = resolve_options(registry, overrides)
    ds = load_routing_dataset(dataset_dir if dataset_dir is not None
                              else newest_routing_dataset(registry.resolve(opts.datasets_dir)))
    samples = [s for split in SPLITS if ds.has_split(split) for s in ds.split(split)]
    enc = load_encoder(opts)
    cache = FeatureCache(registry.resolve(opts.cache_dir), enc.fingerprint())
    _, stats = embed_dataset(enc, samples, cache, workers=opts.workers, batch_size=opts.embed_batch_size,
                             progress=progress)
    return {**stats, "dataset_dir": str(ds.dir), "samples": len(samples), "cache_dir": str(cache.dir)}


def run_eval(registry: Registry, *, dataset_dir: str | Path | None = None, split: str = "val",
             router_dir: str | Path | None = None, overrides: dict[str, Any] | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """``router eval``: the live router's metrics on a routing dataset split (default: newest, val).

    Uses the router's own base model, pooling and layer (from router.json) and the
    feature cache; dataset labels map onto the router's by adapter name.
    """
    from vlrouter.core.data import load_routing_dataset, newest_routing_dataset
    from vlrouter.core.errors import StaleRouterError
    from vlrouter.core.features import FeatureCache, embed_dataset
    from vlrouter.core.head import load_router

    opts = resolve_options(registry, overrides)
    rdir = Path(router_dir) if router_dir is not None else registry.router_dir
    head, meta = load_router(rdir)
    ds = load_routing_dataset(dataset_dir if dataset_dir is not None
                              else newest_routing_dataset(registry.resolve(opts.datasets_dir)))
    samples = ds.split(split)
    unknown = sorted({s.adapter for s in samples} - set(meta.adapters))
    if unknown:
        raise StaleRouterError(located(rdir / "router.json", "adapters",
                                       f"the router does not know {', '.join(unknown)} (router: {meta.adapters})",
                                       fix="run `router retrain`, or evaluate on a dataset built for this router"))
    eval_opts = opts.model_copy(update={"base_model": meta.base_model, "pooling": meta.pooling, "layer": meta.layer})
    enc = load_encoder(eval_opts)
    fp = enc.fingerprint()
    if meta.encoder_fingerprint and meta.encoder_fingerprint != fp:
        progress_or_null(progress).log(f"note: encoder fingerprint {fp} differs from training's "
                                       f"{meta.encoder_fingerprint} (other weights or settings)")
    feats, estats = embed_dataset(enc, samples, FeatureCache(registry.resolve(opts.cache_dir), fp),
                                  workers=opts.workers, batch_size=opts.embed_batch_size, progress=progress)
    index = {n: i for i, n in enumerate(meta.adapters)}
    labels = [index[s.adapter] for s in samples]
    metrics = evaluate(head, feats, labels, class_names=list(meta.adapters), temperature=meta.temperature)
    return {"metrics": metrics, "router_dir": str(rdir), "dataset_dir": str(ds.dir), "split": split,
            "embedded_new": estats["embedded_new"], "reused_cached": estats["reused_cached"]}
