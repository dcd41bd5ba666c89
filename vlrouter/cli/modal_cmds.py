"""Modal commands: ``upload-dataset`` (the seed's step 2, on its own).

``router retrain --backend modal`` uploads the dataset it builds by itself; this command
is for uploading one built earlier with ``router build-dataset``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vlrouter.backends.modal_run import check_credentials, upload_dataset
from vlrouter.cli.app import app
from vlrouter.cli.options import DEFAULT_REGISTRY, JsonOpt, RegistryOpt
from vlrouter.cli.ui import RichProgress, console, print_json
from vlrouter.core.data import newest_routing_dataset
from vlrouter.core.registry import Registry


@app.command("upload-dataset")
def upload_dataset_cmd(
    dataset: Annotated[Optional[Path], typer.Argument(
        help="A routing dataset folder (routing_YYYYMMDD_HHMMSS). Default: the newest under "
             "train.datasets_dir.")] = None,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Upload a routing dataset and its screenshots to the Modal data volume (modal.data_volume,
    default moe-lora-data) under /datasets/<name>/."""
    check_credentials()  # before anything else: no token, no work
    reg = Registry.load(registry)
    ds = dataset if dataset is not None else newest_routing_dataset(reg.resolve(reg.model.train.datasets_dir))
    where = upload_dataset(reg, ds, progress=RichProgress())
    if as_json:
        print_json({"dataset_dir": str(ds), "uploaded_to": where})
    else:
        console.print(f"uploaded {ds} to {where}", highlight=False, soft_wrap=True)
