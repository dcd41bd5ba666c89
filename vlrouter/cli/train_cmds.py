"""Training commands: ``build-dataset``, ``embed``, ``train``, ``eval``, ``retrain``.

Each is a thin shell over :mod:`vlrouter.core.recipe` (which never prints): options in,
rich progress while it runs, a short report out. ``retrain`` = build-dataset + embed +
train + eval + gate/promote, on the backend the plugin manager finds for its name.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from vlrouter.cli.app import app
from vlrouter.cli.options import (
    DEFAULT_REGISTRY,
    BackendOpt,
    BaseModelOpt,
    BatchSizeOpt,
    DeviceOpt,
    EpochsOpt,
    EvalSamplesOpt,
    ForceOpt,
    GpuOpt,
    JsonOpt,
    LrOpt,
    PatienceOpt,
    RegistryOpt,
    TrainSamplesOpt,
    overrides,
)
from vlrouter.cli.ui import RichProgress, console, print_json
from vlrouter.core.errors import InputError, located
from vlrouter.core.features import POOL_MIN_SAMPLES
from vlrouter.core.metrics import plot_confusion
from vlrouter.core.options import resolve_options
from vlrouter.core.recipe import RetrainResult, build_dataset, evaluate_router, run_embed, run_retrain, run_train
from vlrouter.core.registry import Registry
from vlrouter.core.report import write_report
from vlrouter.plugins.manager import get_backend, get_plugin_manager

DatasetOpt = Annotated[Optional[Path], typer.Option(
    "--dataset", help="A routing dataset folder (routing_YYYYMMDD_HHMMSS). Default: the newest under "
                      "train.datasets_dir.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Sampling/split/training seed (train.seed).")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=1, max=256, help="Processes for image decoding + the processor (train.workers; default auto: "
                                      "1 below 4 CPU cores, else min(4, cores - 1)).")]


class Split(str, enum.Enum):
    val = "val"
    eval = "eval"
    train = "train"


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else ("-" if x is None else str(x))


def _metrics_tables(metrics: dict[str, Any], title: str) -> None:
    names = metrics["class_names"]
    per = Table(title=title, title_justify="left")
    for col in ("adapter", "precision", "recall", "F1", "support"):
        per.add_column(col, justify="left" if col == "adapter" else "right")
    for n in names:
        m = metrics["per_class"][n]
        per.add_row(escape(n), _fmt(m["precision"]), _fmt(m["recall"]), _fmt(m["f1"]), str(m["support"]))
    console.print(per)
    conf = Table(title="confusion matrix (rows: true adapter, columns: predicted)", title_justify="left")
    conf.add_column("true \\ predicted")
    for n in names:
        conf.add_column(escape(n), justify="right")
    for n, row in zip(names, metrics["confusion"]):
        conf.add_row(escape(n), *[f"[bold]{v}[/]" if i == names.index(n) else str(v) for i, v in enumerate(row)])
    console.print(conf)
    if "ece" in metrics:
        console.print(f"accuracy {metrics['accuracy']:.3f} on {metrics['n']} samples; ECE {metrics['ece']:.3f} "
                      f"before, {metrics['ece_calibrated']:.3f} after temperature {metrics['temperature']:.3g}",
                      highlight=False)


def _report(result: RetrainResult, *, as_json: bool) -> None:
    if as_json:
        print_json({k: getattr(result, k) for k in ("promoted", "message", "router_dir", "candidate_dir",
                                                    "dataset_dir", "adapters", "val_acc", "live_val_acc",
                                                    "embedded_new", "reused_cached", "backend", "representation",
                                                    "solver", "metrics")})
        return
    _metrics_tables(result.metrics, f"validation ({result.metrics.get('n_val')} samples)")
    t = Table(show_header=False, title="router", title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("adapters", escape(", ".join(result.adapters)))
    t.add_row("val accuracy", _fmt(result.val_acc))
    live = _fmt(result.live_val_acc) if result.live_val_acc is not None else "- (not comparable)"
    t.add_row("live val accuracy", live)
    t.add_row("features", f"embedded {result.embedded_new} new, reused {result.reused_cached} cached")
    t.add_row("representation", escape(f"{result.representation} (chosen by CV on the training split)"))
    t.add_row("head", escape(f"{result.solver}; {result.metrics.get('val_known_rate', 1):.0%} of val known (OOD)"))
    if "eval" in result.metrics:
        ev = result.metrics["eval"]
        t.add_row("eval accuracy", f"{ev['accuracy']:.3f} on {ev['n']} held-out")
    t.add_row("dataset", escape(result.dataset_dir))
    t.add_row("router", escape(result.router_dir))
    console.print(t)
    console.print(("[green]" if result.promoted else "[yellow]") + escape(result.message) + "[/]", highlight=False)


@app.command("build-dataset")
def build_dataset_cmd(
    train_samples: TrainSamplesOpt = None,
    eval_samples: EvalSamplesOpt = None,
    seed: SeedOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Parent folder (default: train.datasets_dir).")] = None,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Sample every adapter's dataset into a labelled routing dataset (train, val, eval + metadata.json).

    Writes train.jsonl, val.jsonl, eval.jsonl (with --eval-samples) and metadata.json into
    train.datasets_dir/routing_YYYYMMDD_HHMMSS. Label = the adapter's position in registry.yaml.
    Seeded and stratified; images that are missing or corrupt are skipped and counted."""
    reg = Registry.load(registry)
    opts = resolve_options(reg, overrides(train_samples=train_samples, eval_samples=eval_samples, seed=seed))
    if out is not None:
        opts = opts.model_copy(update={"datasets_dir": str(out.resolve())})
    path = build_dataset(reg, opts, RichProgress())
    meta = json.loads((path / "metadata.json").read_text())
    if as_json:
        print_json({"dataset_dir": str(path), **meta})
        return
    t = Table(title=f"routing dataset {path.name}", title_justify="left")
    t.add_column("label", justify="right")
    t.add_column("adapter")
    splits = list(meta["counts"])
    for s in splits:
        t.add_column(s, justify="right")
    t.add_column("skipped", justify="right")
    for i, name in enumerate(meta["class_names"]):
        sk = meta["sources"][i]["skipped"]
        t.add_row(str(i), escape(name), *[str(meta["counts"][s].get(name, 0)) for s in splits],
                  str(sk["missing"] + sk["corrupt"]))
    console.print(t)
    console.print(f"wrote {escape(str(path))}", highlight=False)


@app.command("embed")
def embed_cmd(
    dataset: DatasetOpt = None,
    workers: WorkersOpt = None,
    base_model_id: BaseModelOpt = None,
    device: DeviceOpt = None,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Embed a routing dataset with the frozen base model into the feature cache (only what is missing).

    Images + processor run in worker processes (train.workers), the forward in this one; features are
    cached by content (screenshot pixels + instruction + encoder), so nothing is embedded twice."""
    reg = Registry.load(registry)
    opts = resolve_options(reg, overrides(workers=workers, base_model_id=base_model_id, device=device))
    stats = run_embed(reg, opts, dataset_dir=dataset, progress=RichProgress())
    if as_json:
        print_json(stats)
        return
    console.print(f"{escape(stats['dataset_dir'])}: {stats['samples']} samples; embedded {stats['embedded_new']} "
                  f"new, reused {stats['reused_cached']} cached ({stats['seconds']:.1f}s); cache "
                  f"{escape(stats['cache_dir'])}", highlight=False)
    console.print(f"workers: {stats['workers_chosen']} ({escape(stats['workers_note'])})"
                  + ("" if stats["workers"] == stats["workers_chosen"] else
                     f"; {stats['workers']} used: worker processes start only for {POOL_MIN_SAMPLES}+ samples"),
                  highlight=False)


@app.command("train")
def train_cmd(
    dataset: DatasetOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    patience: PatienceOpt = None,
    base_model_id: BaseModelOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    force: ForceOpt = False,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Train the router head on a routing dataset's cached features, then promote it (eval gate).

    Default dataset: the newest. The new router is kept out if it scores below the live router on the
    same validation samples (--force to promote anyway)."""
    reg = Registry.load(registry)
    opts = resolve_options(reg, overrides(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience,
                                          base_model_id=base_model_id, seed=seed, device=device))
    result = run_train(reg, opts, dataset_dir=dataset, force=force, progress=RichProgress())
    _report(result, as_json=as_json)


@app.command("retrain")
def retrain_cmd(
    backend: BackendOpt = None,
    force: ForceOpt = False,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    patience: PatienceOpt = None,
    base_model_id: BaseModelOpt = None,
    train_samples: TrainSamplesOpt = None,
    eval_samples: EvalSamplesOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    gpu: GpuOpt = None,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Build the routing dataset, embed what is missing, train, evaluate and promote (eval gate).

    The new router is kept out if it scores below the live router on the same validation samples
    (--force to promote anyway). --backend modal runs the heavy steps on Modal."""
    reg = Registry.load(registry)
    opts = resolve_options(reg, overrides(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience,
                                          base_model_id=base_model_id, train_samples=train_samples,
                                          eval_samples=eval_samples, seed=seed, device=device, gpu=gpu,
                                          backend=backend))
    if gpu and opts.backend != "modal":
        raise InputError(located(None, "--gpu", "chooses a Modal GPU", fix="add --backend modal, or drop --gpu"))
    fn = get_backend(get_plugin_manager(reg), opts.backend)
    result = run_retrain(reg, opts, fn, force=force, progress=RichProgress())
    _report(result, as_json=as_json)


@app.command("eval")
def eval_cmd(
    dataset: DatasetOpt = None,
    split: Annotated[Split, typer.Option("--split", help="Which split to score.")] = Split.val,
    png: Annotated[Optional[Path], typer.Option(
        "--png", help="Where to write the confusion-matrix PNG "
                      "(default: <dataset>/eval/<split>_confusion.png).")] = None,
    report_dir: Annotated[Optional[Path], typer.Option(
        "--report", help="Write report.html (confusion, per-class P/R/F1, reliability diagram, every misrouted "
                         "sample as a thumbnail) and misrouted.jsonl into this folder.")] = None,
    device: DeviceOpt = None,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Score the live router on a routing dataset split: accuracy, per-class P/R/F1, confusion, ECE.

    Default: the newest routing dataset's val split. Prints the tables and writes the confusion matrix
    as a PNG; ECE before and after the router's temperature. Reuses cached features. --report DIR adds
    a self-contained HTML report with the misrouted screenshots."""
    reg = Registry.load(registry)
    opts = resolve_options(reg, overrides(device=device))
    report = evaluate_router(reg, opts, dataset_dir=dataset, split=split.value, progress=RichProgress())
    out = png if png is not None else Path(report["dataset_dir"]) / "eval" / f"{split.value}_confusion.png"
    plot_confusion(report["metrics"], out, title=f"{Path(report['dataset_dir']).name} / {split.value}")
    report["png"] = str(out)
    if report_dir is not None:
        report["report"] = str(write_report(report, report_dir))
    if as_json:
        print_json({k: v for k, v in report.items() if k != "samples"} |
                   {"misrouted": [r for r in report["samples"] if r["routed"] != r["adapter"]]})
        return
    _metrics_tables(report["metrics"], f"router {escape(report['router_dir'])} on {split.value} "
                                       f"({report['metrics']['n']} samples)")
    console.print(f"features: embedded {report['embedded_new']} new, reused {report['reused_cached']} cached",
                  highlight=False)
    console.print(f"representation: {escape(report['representation'])} (router.json pooling {report['pooling']}, "
                  f"layer {report['layer']})", highlight=False)
    console.print(f"confusion matrix: {escape(str(out))}", highlight=False)
    if "report" in report:
        console.print(f"report: {escape(report['report'])} (misrouted samples: "
                      f"{sum(r['routed'] != r['adapter'] for r in report['samples'])})", highlight=False)
