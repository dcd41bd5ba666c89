"""`router demo`: the whole framework, offline, on synthetic screenshots, in minutes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from vlrouter.cli.app import app
from vlrouter.cli.ui import RichProgress, console
from vlrouter.demo.pipeline import DemoConfig, check_demo_dir, run_demo


def _step(title: str) -> None:
    console.rule(f"[bold cyan]{title}")


def _on_step(name: str, report) -> None:
    if name == "datasets":
        console.print(f"wrote 4 synthetic adapter datasets under {report.root / 'data'}")
    elif name == "loras":
        t = Table(title="demo LoRA adapters (peft, trained briefly)")
        for col in ("adapter", "steps", "final loss", "generations that parse as an action"):
            t.add_column(col)
        for r in report.lora:
            t.add_row(r.adapter, str(r.steps), f"{r.final_loss:.3f}", f"{r.parse_rate:.0%} of {r.checked}")
        console.print(t)
        _step("router retrain (calendar, claim-window, provider-select)")
    elif name == "retrain":
        r = report.retrain
        console.print(f"validation accuracy [bold]{r.val_acc:.3f}[/] over {', '.join(r.adapters)}; "
                      f"embedded {r.embedded_new} new samples, reused {r.reused_cached} cached; "
                      f"promoted: {r.promoted}")
        console.print(f"representation chosen by cross-validation on the training split: {r.representation} "
                      f"(solver {r.solver})", highlight=False)
        _step("router add-adapter settings-toggle")
    elif name == "add-adapter":
        r = report.add_adapter
        console.print(f"embedded only the new adapter's samples: [bold]embedded_new={r.embedded_new}[/], "
                      f"reused_cached={r.reused_cached}; the router now has {len(r.adapters)} labels "
                      f"({', '.join(r.adapters)}); validation accuracy [bold]{r.val_acc:.3f}[/]")
        _step("router eval")
    elif name == "eval":
        m = report.eval["metrics"]
        console.print(f"accuracy {m['accuracy']:.3f}; ECE {m['ece']:.3f} before "
                      f"temperature, {m['ece_calibrated']:.3f} after; confusion matrix: "
                      f"{report.confusion_png}")
        _step("engine.act on held-out screenshots")
    elif name == "act":
        t = Table(title="engine.act on held-out screenshots")
        for col in ("prompt", "task", "adapter", "confidence", "action"):
            t.add_column(col, overflow="fold")
        for a in report.acts:
            ok = "green" if a["adapter"] == a["task"] else "red"
            t.add_row(a["prompt"], a["task"], f"[{ok}]{a['adapter']}[/]", f"{a['confidence']:.2f}",
                      a["action"] or f"[dim](unparsed) {a['text']!r}[/]")
        console.print(t)


@app.command("demo")
def demo_cmd(
    directory: Annotated[Path, typer.Argument(help="Folder to create the demo in (datasets, models, registry).")]
    = Path("vlrouter-demo"),
    base_model: Annotated[Optional[str], typer.Option(
        "--base-model", help="Use this Qwen3-VL (hub id or local path) instead of building the tiny random one.")]
    = None,
    samples: Annotated[int, typer.Option("--samples", min=4, help="Screenshots per task.")] = 100,
    lora_steps: Annotated[int, typer.Option("--lora-steps", min=1, help="Training steps per demo LoRA.")] = 80,
    heldout: Annotated[int, typer.Option("--heldout", min=1, help="Held-out screenshots per task to route "
                                         "(accuracy and calibration).")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Seed for data, adapters and router.")] = 0,
) -> None:
    """Run the offline demo: datasets, tiny base model, LoRAs, retrain, add-adapter, eval, act."""
    check_demo_dir(directory)  # before anything is printed or built
    start = time.perf_counter()
    _step("vlrouter demo: synthetic screenshots, tiny Qwen3-VL, 4 LoRA adapters")
    cfg = DemoConfig(samples_per_task=samples, lora_steps=lora_steps, seed=seed, heldout_per_task=heldout,
                     base_model=base_model)
    report = run_demo(directory, cfg,
                      progress=RichProgress(console), on_step=_on_step)
    _step("done")
    console.print(f"held-out routing accuracy [bold]{report.heldout_accuracy:.1%}[/] on {report.heldout_n} "
                  f"screenshots (ECE {report.heldout_ece:.3f} after temperature; {report.heldout_known:.0%} known), "
                  f"actions parsed {report.parse_rate:.0%}; total {time.perf_counter() - start:.0f} s. "
                  f"Try: router act {report.acts[0]['image'] if report.acts else 'IMAGE'} \"...\" "
                  f"--registry {directory / 'registry.yaml'}")
