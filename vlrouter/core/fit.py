"""Train the router head on pooled features: tensors and options in, the best head out.

Two solvers. ``lbfgs`` (the default for the linear head): full-batch L-BFGS on the
L2-regularised multinomial logistic loss over standardized features -- it converges to
the optimum a logistic-regression library would find, in a fraction of a second for
thousands of samples. ``adamw``: the seed's minibatch training (AdamW, plateau LR,
early stopping on validation loss, best evaluation kept), for the MLP head and for
anyone who passes the seed's ``--lr/--batch-size/--patience``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlrouter.core.errors import TrainingError, located
from vlrouter.core.head import HeadShape, build_head, standardize_stats
from vlrouter.core.progress import Progress, progress_or_null
from vlrouter.core.registry import TrainSection

if TYPE_CHECKING:
    import torch

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # the L2 strengths cross-validation chooses from (train.l2: auto)
MINIBATCH_SETTINGS = ("lr", "batch_size", "patience", "eval_every")  # AdamW's knobs: naming one picks adamw


def resolve_solver(head: str, solver: str, given) -> tuple[str, str]:
    """``train.solver: auto`` resolved, with the reason: lbfgs for the linear head, unless one of
    :data:`MINIBATCH_SETTINGS` is among the ``given`` setting names (then adamw, as in the seed)."""
    if solver != "auto":
        return solver, f"train.solver: {solver}"
    if head == "mlp":
        return "adamw", "the mlp head trains with AdamW"
    named = [k for k in MINIBATCH_SETTINGS if k in given]
    if named:
        flags = ", ".join("--" + k.replace("_", "-") for k in named)
        return "adamw", f"{flags} given (AdamW's settings, as in the seed)"
    return "lbfgs", "default: L-BFGS on the L2-regularised logistic loss (converges; l2 by cross-validation)"




@contextmanager
def one_thread() -> Iterator[None]:
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


def as_labels(y) -> torch.Tensor:
    """Labels as a 1-D long tensor."""
    import torch

    return torch.as_tensor(y, dtype=torch.long).reshape(-1)


def _check_inputs(x, y, vx, vy, num_labels: int | None, class_names: list[str] | None):
    """Validate shapes and labels; return ``(k, names, class_weights or None)``."""
    import torch

    if x.ndim != 2 or x.shape[0] == 0:
        raise TrainingError(located(None, "train split", "no training features",
                                    fix="the routing dataset's train split is empty: add samples"))
    if vx.ndim != 2 or vx.shape[0] == 0:
        raise TrainingError(located(None, "val split", "no validation features",
                                    fix="the routing dataset's val split is empty: add samples"))
    if x.shape[0] != y.shape[0] or vx.shape[0] != vy.shape[0] or x.shape[1] != vx.shape[1]:
        raise TrainingError(located(None, "features", f"feature/label shapes disagree: train {tuple(x.shape)} / "
                                    f"{tuple(y.shape)}, val {tuple(vx.shape)} / {tuple(vy.shape)}",
                                    fix="rebuild the routing dataset with `router build-dataset`"))
    k = num_labels or int(max(y.max(), vy.max())) + 1
    names = class_names or [str(i) for i in range(k)]
    if int(max(y.max(), vy.max())) >= k or int(min(y.min(), vy.min())) < 0:
        raise TrainingError(located(None, "labels", f"labels must lie in 0..{k - 1}",
                                    fix="rebuild the routing dataset with `router build-dataset`"))
    if k < 2:
        raise TrainingError(located(None, "labels", "a router needs at least two labels",
                                    fix="register another adapter"))
    counts = torch.bincount(y, minlength=k)
    if (counts == 0).any():
        empty = [names[i] for i in range(k) if counts[i] == 0]
        raise TrainingError(located(None, "train split", f"no training samples for {', '.join(empty)}",
                                    fix="add samples to its dataset"))
    imbalanced = bool(counts.max() != counts.min())
    return k, names, (counts.sum() / (k * counts.float())) if imbalanced else None


@dataclass
class _Run:
    """One training run's mutable state: the head, its optimiser, and the best evaluation so far."""

    head: Any
    opt: Any
    sched: Any
    val_x: Any
    val_y: Any
    patience: int
    writer: Any = None
    step: int = 0
    best_loss: float = math.inf
    best_acc: float = 0.0
    best_step: int = 0
    since_best: int = 0
    last_eval: int = -1
    best_state: dict = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def snapshot(self) -> None:
        self.best_state = {n: t.detach().clone() for n, t in self.head.state_dict().items()}

    def evaluate(self) -> bool:
        """Score the head on the validation split; keep it if best. True when patience ran out."""
        import torch
        from torch import nn

        self.head.eval()
        with torch.no_grad():
            logits = self.head(self.val_x)
            vloss = float(nn.functional.cross_entropy(logits, self.val_y))
            vacc = float((logits.argmax(1) == self.val_y).float().mean())
        self.head.train()
        self.last_eval = self.step
        lr_now = self.opt.param_groups[0]["lr"]
        self.history.append({"step": self.step, "val_loss": vloss, "val_acc": vacc, "lr": lr_now})
        if self.writer is not None:
            self.writer.add_scalar("val/loss", vloss, self.step)
            self.writer.add_scalar("val/acc", vacc, self.step)
            self.writer.add_scalar("train/lr", lr_now, self.step)
        self.sched.step(vloss)
        if vloss < self.best_loss - 1e-7:
            self.best_loss, self.best_acc, self.best_step, self.since_best = vloss, vacc, self.step, 0
            self.snapshot()
            return False
        self.since_best += 1
        return self.since_best >= self.patience


def _train_lbfgs(x, y, vx, vy, options: TrainSection, l2: float, k: int, weights, prog) -> tuple[Any, dict[str, Any]]:
    """The lbfgs branch of :func:`train_head`: Standardize(train stats) -> Linear(W, b) from :func:`fit_logistic`."""
    import torch
    from torch import nn

    t0 = time.perf_counter()
    shape = HeadShape(kind="linear", in_dim=int(x.shape[1]), hidden=0, num_labels=k)
    head = build_head(shape)
    mean, std = standardize_stats(x)
    with torch.no_grad():
        head[0].mean.copy_(mean)
        head[0].std.copy_(std)
    with prog.task("training head (lbfgs)", total=1) as task:
        w, b, fstats = fit_logistic((x - mean) / std, y, num_labels=k, l2=l2, weights=weights,
                                    max_iter=options.epochs if options.epochs > 1 else 1)
        task.advance()
    with torch.no_grad():
        head[1].weight.copy_(w)
        head[1].bias.copy_(b)
    head.eval()
    with torch.no_grad():
        logits = head(vx)
        vloss = float(nn.functional.cross_entropy(logits, vy))
        vacc = float((logits.argmax(1) == vy).float().mean())
    seconds = time.perf_counter() - t0
    stats = {
        "solver": "lbfgs", "l2": l2, "best_loss": vloss, "best_acc": vacc, "best_step": fstats["iterations"],
        "steps": fstats["iterations"], "epochs_run": fstats["evaluations"], "stopped_early": False,
        "train_loss": fstats["loss"],
        "class_weights": [round(float(v), 4) for v in weights] if weights is not None else None,
        "n_train": int(x.shape[0]), "n_val": int(vx.shape[0]), "seconds": round(seconds, 3),
        "samples_per_s": round(fstats["evaluations"] * x.shape[0] / max(seconds, 1e-9), 1), "history": [],
    }
    prog.log(f"head (lbfgs, l2 {l2:g}): val loss {vloss:.4f}, val acc {vacc:.3f} after {fstats['iterations']} "
             "iterations")
    return head, stats


def _fit(x, y, vx, vy, options: TrainSection, shape: HeadShape, weights, writer, prog,
         steps_per_epoch: int) -> tuple[_Run, bool]:
    """The training loop of :func:`train_head` (seeded, on a forked RNG). Returns the run and
    whether it stopped early; the run's head holds the best evaluation's weights."""
    import torch
    from torch import nn

    bs, epochs = options.batch_size, options.epochs
    stopped_early = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        head = build_head(shape)
        head[0].fit(x)
        gen = torch.Generator().manual_seed(options.seed)
        loss_fn = nn.CrossEntropyLoss(weight=weights)  # no label smoothing: a handful of classes
        opt = torch.optim.AdamW(head.parameters(), lr=options.lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5,
                                                           patience=max(1, options.patience // 2))
        run = _Run(head=head, opt=opt, sched=sched, val_x=vx, val_y=vy, patience=options.patience, writer=writer)
        run.snapshot()
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
                    run.step += 1
                    task.advance()
                    if writer is not None:
                        writer.add_scalar("train/loss", loss.item(), run.step)
                    if run.step % options.eval_every == 0 and run.evaluate():
                        stopped_early = True
                        break
                if stopped_early:
                    break
            if run.last_eval != run.step:
                run.evaluate()
    head.load_state_dict(run.best_state)
    head.eval()
    return run, stopped_early


def fit_logistic(x: torch.Tensor, y, *, num_labels: int, l2: float, weights: torch.Tensor | None = None,
                 max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Multinomial logistic regression by full-batch L-BFGS: ``min mean CE(xW^T + b) + l2/2 |W|^2``.

    ``x`` should be standardized. Float64, deterministic, no minibatch noise; stops when the
    gradient or the loss change vanishes, or after ``max_iter`` iterations. Returns
    ``(W [C, D], b [C], stats)`` as float32.
    """
    import torch
    from torch import nn

    xd, yy = x.double(), as_labels(y)
    w = torch.zeros(num_labels, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    cw = weights.double() if weights is not None else None
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    evals = [0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(xd @ w.T + b, yy, weight=cw) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        evals[0] += 1
        return loss

    with one_thread():
        opt.step(closure)
        with torch.no_grad():
            loss = float(nn.functional.cross_entropy(xd @ w.T + b, yy, weight=cw) + 0.5 * l2 * (w * w).sum())
    state = opt.state[opt._params[0]]
    return w.detach().float(), b.detach().float(), {"loss": loss, "iterations": int(state.get("n_iter", 0)),
                                                     "evaluations": evals[0]}


def train_head(train_feats: torch.Tensor, train_labels, val_feats: torch.Tensor, val_labels,
               options: TrainSection, progress: Progress | None = None, *, num_labels: int | None = None,
               class_names: list[str] | None = None, log_dir: str | Path | None = None,
               l2: float | None = None) -> tuple[Any, dict[str, Any]]:
    """Train the router head (fp32) on pooled features; return ``(head, stats)``.

    ``options.solver`` ``lbfgs`` (linear head only): :func:`fit_logistic` on the standardized
    training features with L2 strength ``l2`` (or ``options.l2``), at most ``options.epochs``
    iterations. ``adamw``: AdamW; ReduceLROnPlateau on validation loss; evaluation every
    ``eval_every`` steps (and after the last step); early stopping after ``patience``
    evaluations without a lower validation loss; at most ``epochs`` epochs; the weights of
    the best evaluation are returned. Both: no label smoothing; inverse-frequency class
    weights when the training classes are imbalanced; the standardizer is fitted on the
    training features only; seeded by ``options.seed`` without touching the global RNG, so
    the same features and seed give identical weights on CPU. With ``log_dir`` (adamw),
    TensorBoard scalars go there. Runs on the CPU with one thread (:func:`one_thread`).
    """
    prog = progress_or_null(progress)
    x, y = train_feats.float(), as_labels(train_labels)
    vx, vy = val_feats.float(), as_labels(val_labels)
    k, _names, weights = _check_inputs(x, y, vx, vy, num_labels, class_names)
    solver, _ = resolve_solver(options.head, getattr(options, "solver", "auto"), options.model_fields_set)
    if solver == "lbfgs":
        if options.head != "linear":
            raise TrainingError(located(None, "train.solver", "lbfgs fits the linear head only",
                                        fix="use train.solver: adamw with train.head: mlp"))
        strength = l2 if l2 is not None else options.l2
        if strength == "auto":  # nobody chose it yet (core.selection.choose does, over the representations too)
            strength, _ = choose_l2(x, y, num_labels=k, folds=options.cv_folds, seed=options.seed, weights=weights,
                                    progress=prog)
        return _train_lbfgs(x, y, vx, vy, options, float(strength), k, weights, prog)
    bs = options.batch_size
    steps_per_epoch = math.ceil(x.shape[0] / bs)
    hidden = options.head_hidden if options.head == "mlp" else 0
    shape = HeadShape(kind=options.head, in_dim=int(x.shape[1]), hidden=hidden, num_labels=k)
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(log_dir))
    t0 = time.perf_counter()
    try:
        with one_thread():
            run, stopped_early = _fit(x, y, vx, vy, options, shape, weights, writer, prog, steps_per_epoch)
    finally:
        if writer is not None:
            writer.flush()
            writer.close()
    seconds = time.perf_counter() - t0
    stats = {
        "solver": "adamw", "best_loss": run.best_loss, "best_acc": run.best_acc, "best_step": run.best_step,
        "steps": run.step,
        "epochs_run": round(run.step / steps_per_epoch, 2), "stopped_early": stopped_early,
        "class_weights": [round(float(w), 4) for w in weights] if weights is not None else None,
        "n_train": int(x.shape[0]), "n_val": int(vx.shape[0]), "seconds": round(seconds, 3),
        "samples_per_s": round(run.step * bs / max(seconds, 1e-9), 1), "history": run.history,
    }
    prog.log(f"head: best val loss {run.best_loss:.4f}, val acc {run.best_acc:.3f} at step {run.best_step} of "
             f"{run.step}" + (" (early stop)" if stopped_early else ""))
    return run.head, stats


def stratified_folds(labels, k: int, seed: int) -> list[list[int]]:
    """``k`` disjoint index lists, each class spread evenly over them (seeded shuffle within each class)."""
    y = as_labels(labels).tolist()
    folds: list[list[int]] = [[] for _ in range(k)]
    rng = random.Random(f"vlrouter:cv:{seed}")
    offset = 0
    for c in sorted(set(y)):
        idx = [i for i, v in enumerate(y) if v == c]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            folds[(offset + j) % k].append(i)
        offset += len(idx)
    return [sorted(f) for f in folds if f]


def cv_score(x: torch.Tensor, labels, folds: list[list[int]], *, num_labels: int, l2: float,
             weights: torch.Tensor | None = None) -> tuple[float, float, torch.Tensor]:
    """Held-out accuracy and log-loss of :func:`fit_logistic` over ``folds`` (standardized per fold), and the
    out-of-fold logits ``[N, C]`` (every sample scored by the model that did not see it)."""
    import torch
    from torch import nn

    y = as_labels(labels)
    oof = torch.zeros(len(y), num_labels)
    everything = set(range(len(y)))
    for held in folds:
        tr = torch.tensor(sorted(everything - set(held)))
        te = torch.tensor(held)
        mean, std = standardize_stats(x[tr])
        w, b, _ = fit_logistic((x[tr] - mean) / std, y[tr], num_labels=num_labels, l2=l2, weights=weights)
        oof[te] = ((x[te] - mean) / std) @ w.T + b
    scored = torch.tensor(sorted(i for f in folds for i in f))
    acc = float((oof[scored].argmax(1) == y[scored]).double().mean())
    nll = float(nn.functional.cross_entropy(oof[scored].double(), y[scored]))
    return acc, nll, oof


def best_l2(scores: list[dict[str, Any]]) -> float:
    """The L2 strength with the highest CV accuracy, then the lowest log-loss, then the strongest."""
    return min(scores, key=lambda s: (-s["cv_acc"], s["cv_nll"], -s["l2"]))["l2"]


def choose_l2(x: torch.Tensor, labels, *, num_labels: int, folds: int = 5, seed: int = 0,
              weights: torch.Tensor | None = None, progress: Progress | None = None) -> tuple[float, list[dict]]:
    """``train.l2: auto`` for a caller that has not chosen one: stratified ``folds``-fold CV of
    :func:`fit_logistic` on ``x`` (the training split) over :data:`L2_GRID`; ``(l2, scores)``."""
    y = as_labels(labels)
    smallest = int(min(y.bincount(minlength=num_labels)[y.unique()]))
    fold_idx = stratified_folds(y, max(2, min(folds, smallest)), seed)
    scores = []
    with progress_or_null(progress).task("choosing the L2 strength (cross-validation)", total=len(L2_GRID)) as task:
        for value in L2_GRID:
            acc, nll, _ = cv_score(x, y, fold_idx, num_labels=num_labels, l2=value, weights=weights)
            scores.append({"l2": value, "cv_acc": round(acc, 4), "cv_nll": round(nll, 4)})
            task.advance()
    return best_l2(scores), scores
