"""Model commands: ``tiny-model OUT_DIR``, a random Qwen3-VL built offline for tests, the demo and benchmarks."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from vlrouter.cli.app import app
from vlrouter.cli.ui import RichProgress, console, quiet_libraries
from vlrouter.core.tiny import PRESETS, build_tiny_model, count_parameters

Preset = enum.Enum("Preset", {name: name for name in PRESETS}, type=str)


@app.command("tiny-model")
def tiny_model_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the model, tokenizer and processor into.")],
    preset: Annotated[Preset, typer.Option(
        "--preset", help="tiny: ~0.2M parameters for tests; demo: ~2M for the demo; 100m: ~100M parameters for "
                         "benchmarks.")] = Preset("tiny"),
) -> None:
    """Build a random Qwen3-VL (model + tokenizer + image processor + chat template) offline.

    The folder loads with from_pretrained like a hub checkpoint: use it as `base_model:`."""
    quiet_libraries()
    name = preset.value
    with RichProgress().task(f"building {name} Qwen3-VL"):
        out = build_tiny_model(out_dir, name)
    console.print(f"wrote a random Qwen3-VL (preset {name}, {count_parameters(out):,} parameters) to "
                  f"{escape(str(out))}", highlight=False, soft_wrap=True)
