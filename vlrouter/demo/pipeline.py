"""The offline demo, step by step: the whole framework on synthetic screenshots in minutes.

1. write adapter datasets (seed JSONL format) for calendar, claim-window,
   provider-select and the fourth task, settings-toggle;
2. build the tiny random Qwen3-VL (or use ``base_model``);
3. make one LoRA adapter per task with peft and train it briefly, reporting how often
   what it generates parses as an action;
4. write registry.yaml with the first three adapters and run ``router retrain``;
5. ``router add-adapter settings-toggle`` (generic JSONL adapter): only its samples are
   embedded, every other feature comes from the cache;
6. ``router eval`` (confusion-matrix PNG);
7. ``engine.act`` on held-out screenshots.

Each step calls the same library function as the matching CLI command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlrouter.core.atomic import atomic_write_bytes
from vlrouter.core.engine import Engine
from vlrouter.core.errors import InputError, located
from vlrouter.core.metrics import expected_calibration_error, plot_confusion
from vlrouter.core.options import resolve_options
from vlrouter.core.progress import Progress, progress_or_null
from vlrouter.core.recipe import edit_adapters, evaluate_router, run_retrain
from vlrouter.core.registry import AdapterEntry, Registry, new_registry_text
from vlrouter.core.tiny import build_tiny_model
from vlrouter.demo.loras import train_demo_lora
from vlrouter.demo.screens import TASKS, write_dataset, write_heldout
from vlrouter.plugins.manager import get_backend, get_plugin_manager, new_adapter_entry, parse_action

SEED_TASKS = ("calendar", "claim-window", "provider-select")
EXTRA_TASK = "settings-toggle"


@dataclass
class DemoConfig:
    samples_per_task: int = 100
    heldout_per_task: int = 100  # routed, for accuracy and calibration (fewer make a noisy ECE)
    act_per_task: int = 2  # of those, generated with the chosen adapter and parsed
    lora_steps: int = 80
    seed: int = 0
    base_model: str | None = None


@dataclass
class DemoReport:
    root: Path
    lora: list[Any] = field(default_factory=list)
    retrain: Any = None
    add_adapter: Any = None
    eval: Any = None
    confusion_png: Path | None = None
    acts: list[dict[str, Any]] = field(default_factory=list)
    heldout_accuracy: float = 0.0
    heldout_ece: float = 0.0
    heldout_known: float = 1.0
    heldout_n: int = 0
    parse_rate: float = 0.0


def _write_registry(root: Path, base_model: str, cfg: DemoConfig) -> Path:
    entries = [
        AdapterEntry(name=t, plugin=f"vlrouter.adapters.{t.replace('-', '_')}", dataset=f"data/{t}/train.jsonl",
                     checkpoint=f"checkpoints/{t}")
        for t in SEED_TASKS
    ]
    text = new_registry_text(  # vlrouter's defaults: views, layer and L2 chosen by cross-validation
        base_model, entries,
        val_fraction=0.2, seed=cfg.seed, train_samples=cfg.samples_per_task,
        workers=1,  # 2 cores: workers cost more than they save
    )
    path = root / "registry.yaml"
    atomic_write_bytes(path, text.encode())
    return path


def check_demo_dir(root: Path) -> None:
    """The demo writes data/, models/, checkpoints/, registry.yaml … into ``root``: only into a new or
    empty folder, so it never overwrites a file of yours."""
    if root.exists() and not root.is_dir():
        raise InputError(located(root, None, "exists and is not a folder", fix="choose a new folder for the demo"))
    if root.is_dir() and any(root.iterdir()):
        shown = ", ".join(sorted(p.name for p in root.iterdir())[:3])
        raise InputError(located(root, None, f"is not empty (holds {shown} …); the demo writes data/, models/, "
                                 "checkpoints/ and registry.yaml there and would overwrite your files",
                                 fix="choose a new or empty folder, e.g. `router demo demo-run`"))


def run_demo(root: str | Path, cfg: DemoConfig | None = None, *, progress: Progress | None = None,
             on_step=None) -> DemoReport:
    """Run every step in ``root`` (created). ``on_step(name, report)`` is called after each."""
    cfg = cfg or DemoConfig()
    progress = progress_or_null(progress)
    note = on_step or (lambda name, report: None)
    root = Path(root)
    check_demo_dir(root)
    root.mkdir(parents=True, exist_ok=True)
    report = DemoReport(root=root)

    with progress.task("writing synthetic datasets", total=len(TASKS)) as t:
        for task in TASKS:
            write_dataset(task, root / "data" / task, cfg.samples_per_task, seed=cfg.seed)
            t.advance()
    note("datasets", report)

    if cfg.base_model:
        # a local folder given on the command line is relative to the working directory, but registry.yaml's
        # paths are relative to its own folder: write it absolute so it means the same everywhere
        given = Path(cfg.base_model).expanduser()
        base_model = str(given.resolve()) if given.exists() else cfg.base_model
    else:
        with progress.task("building the tiny random Qwen3-VL", total=1) as t:
            build_tiny_model(root / "models" / "tiny-qwen3-vl", "demo")
            t.advance()
        base_model = "models/tiny-qwen3-vl"
    base_path = str(root / base_model) if (root / base_model).exists() else base_model

    pm = get_plugin_manager(entry_points=False)
    for task in TASKS:
        ck = root / "checkpoints" / task
        rep = train_demo_lora(base_path, root / "data" / task / "train.jsonl", ck, adapter=task,
                              steps=cfg.lora_steps, lr=3e-3, seed=cfg.seed, progress=progress,
                              parse=lambda text, _t=task: parse_action(pm, _t, text))
        report.lora.append(rep)
    note("loras", report)

    reg_path = _write_registry(root, base_model, cfg)
    registry = Registry.load(reg_path)
    options = resolve_options(registry)
    backend = get_backend(get_plugin_manager(registry), options.backend)
    report.retrain = run_retrain(registry, options, backend, progress=progress)  # router retrain
    note("retrain", report)

    # router add-adapter settings-toggle --dataset ... --checkpoint ... (the generic JSONL adapter)
    registry = Registry.load(reg_path)
    entry, _ = new_adapter_entry(registry, EXTRA_TASK,
                                 dataset=os.path.relpath(root / "data" / EXTRA_TASK / "train.jsonl"),
                                 checkpoint=os.path.relpath(root / "checkpoints" / EXTRA_TASK))
    new_registry = registry.add_adapter(entry)
    new_registry.check_paths([EXTRA_TASK])
    report.add_adapter = edit_adapters(new_registry, backend=backend, options=resolve_options(new_registry),
                                       progress=progress)
    note("add-adapter", report)

    registry = Registry.load(reg_path)
    report.eval = evaluate_router(registry, resolve_options(registry), progress=progress)  # router eval
    report.confusion_png = plot_confusion(report.eval["metrics"], root / "confusion_matrix.png",
                                          title="demo router, validation split")
    note("eval", report)

    import torch

    heldout = write_heldout(root / "heldout", cfg.heldout_per_task, seed=cfg.seed + 1000)
    engine = Engine.from_registry(reg_path)
    routes = []
    with progress.task("routing held-out screenshots", total=len(heldout)) as t:
        for start in range(0, len(heldout), 16):
            part = heldout[start:start + 16]
            routes += engine.route_batch([(h["image"], h["prompt"]) for h in part])
            t.advance(len(part))
    names = engine.adapters
    probs = torch.tensor([[r.probs[n] for n in names] for r in routes], dtype=torch.float64)
    truth = torch.tensor([names.index(h["task"]) for h in heldout])
    report.heldout_n = len(heldout)
    report.heldout_accuracy = sum(r.adapter == h["task"] for r, h in zip(routes, heldout)) / len(heldout)
    report.heldout_ece = expected_calibration_error(probs, truth)
    report.heldout_known = sum(r.known for r in routes) / len(routes)
    acting = [h for task in TASKS for h in [x for x in heldout if x["task"] == task][:cfg.act_per_task]]
    with progress.task("engine.act on held-out screenshots", total=len(acting)) as t:
        for item in acting:
            action = engine.act(item["image"], item["prompt"], max_new_tokens=24)
            report.acts.append({
                "image": item["image"], "prompt": item["prompt"], "task": item["task"], "adapter": action.adapter,
                "confidence": action.confidence, "action": str(action.action) if action.action else None,
                "text": action.text, "expected": item["action"],
            })
            t.advance()
    report.parse_rate = sum(a["action"] is not None for a in report.acts) / max(1, len(report.acts))
    note("act", report)
    return report
