"""Shared ``Annotated`` option aliases, so every command spells an option the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vlrouter.cli.ui import json_mode

RegistryOpt = Annotated[
    Path,
    typer.Option("--registry", "-r", envvar="VLROUTER_REGISTRY", help="Path to registry.yaml.",
                 show_default=True),
]
DEFAULT_REGISTRY = Path("registry.yaml")

JsonOpt = Annotated[bool, typer.Option("--json", callback=json_mode,
                                       help="Print machine-readable JSON instead of tables (errors too).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 … (default: auto).")]

# The seed's training flags; they override registry.yaml's `train:` values.
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", min=1, help="Training epochs (train.epochs).")]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Head batch size (train.batch_size).")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", min=0.0, help="AdamW learning rate (train.lr).")]
PatienceOpt = Annotated[Optional[int], typer.Option("--patience", min=1,
                                                    help="Evals without improvement before stopping (train.patience).")]
BaseModelOpt = Annotated[Optional[str], typer.Option("--base-model-id",
                                                     help="Hub id or local path of the Qwen3-VL base (base_model).")]
TrainSamplesOpt = Annotated[Optional[int], typer.Option("--train-samples", min=1,
                                                        help="Samples taken per adapter for the routing dataset.")]
EvalSamplesOpt = Annotated[Optional[int], typer.Option(
    "--eval-samples", min=0, help="Extra held-out samples per adapter (seed's --eval-samples).")]
BackendOpt = Annotated[Optional[str], typer.Option(
    "--backend", help="Training backend: local or modal (train.backend).")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Promote even if validation accuracy is below the live router's.")]
GpuOpt = Annotated[Optional[str], typer.Option(
    "--gpu", help="Modal GPU type for --backend modal, e.g. H100, A100-80GB, H100:2 (default: modal.gpu in "
                  "registry.yaml).")]
NoRetrainOpt = Annotated[bool, typer.Option(
    "--no-retrain", help="Only edit registry.yaml; the router stays stale until `router retrain`.")]

def overrides(**flags) -> dict:
    """The flags that were given (``None`` means not given), by training-option name."""
    return {k: v for k, v in flags.items() if v is not None}
