"""``router import-seed-head``: the seed's pickled router-head.pt into a vlrouter router folder.

Reads the file with ``torch.load(weights_only=True)`` only (see
:mod:`vlrouter.core.seed_import`); writes head.safetensors + router.json into a new
folder. The imported head is for inspection and migration: the seed trained it on
token-0 features, which are constant, so it needs retraining to route.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from vlrouter.cli.app import app
from vlrouter.cli.options import JsonOpt
from vlrouter.cli.ui import console, err_console, print_json
from vlrouter.core.errors import InputError, located
from vlrouter.core.seed_import import WARNING, import_seed_head
from vlrouter.core.store import read_meta


@app.command("import-seed-head")
def import_seed_head_cmd(
    pt_path: Annotated[Path, typer.Argument(help="The seed's router-head.pt (a torch.save file).",
                                            show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="New folder for head.safetensors + router.json.",
                                      show_default=False)],
    pooling: Annotated[Optional[str], typer.Option(
        "--pooling", help="mean or last: required. The seed pooled token 0 (constant under causal attention); "
                          "neither choice reproduces it.")] = None,
    base_model: Annotated[Optional[str], typer.Option(
        "--base-model", help="Base model id or path (default: the checkpoint's base_model_id).")] = None,
    layer: Annotated[int, typer.Option("--layer", help="Hidden layer to pool (negative counts from the end).")] = -1,
    adapters: Annotated[Optional[str], typer.Option(
        "--adapters", help="Comma-separated adapter names in label order (default: the checkpoint's list).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import the seed's router-head.pt (weights only, never unpickling code) into a router folder.

    For inspection and migration: the seed's head was trained on token-0 features, which are the same
    for every input, so the imported router needs `router retrain` before it routes."""
    if pooling is None:
        raise InputError(located(None, "--pooling", "required: the seed pooled token 0, which vlrouter does not "
                                 "offer (constant under causal attention)",
                                 fix="pass --pooling mean or --pooling last"))
    names = [a for a in adapters.split(",") if a.strip()] if adapters is not None else None
    path = import_seed_head(pt_path, out, pooling=pooling, base_model=base_model, layer=layer, adapters=names)
    meta = read_meta(path)
    if as_json:
        print_json({"router_dir": str(path), "adapters": meta.adapters, "base_model": meta.base_model,
                    "pooling": meta.pooling, "layer": meta.layer, "head": meta.head.model_dump(),
                    "needs_retraining": True, "warning": WARNING})
        return
    console.print(f"wrote {escape(str(path))}: {meta.head.kind} head, {meta.head.in_dim} -> {meta.head.num_labels} "
                  f"({escape(', '.join(meta.adapters))}), base model {escape(meta.base_model)}, pooling "
                  f"{meta.pooling}, layer {meta.layer}", highlight=False, soft_wrap=True)
    err_console.print(f"[yellow]warning:[/] {escape(WARNING)}", highlight=False, soft_wrap=True)
