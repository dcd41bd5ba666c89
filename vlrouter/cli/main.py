"""Entry point of the `router` console script: imports every command module onto the app."""

from __future__ import annotations

import importlib

from vlrouter.cli.app import app
from vlrouter.cli.ui import quiet_libraries

COMMAND_MODULES = (
    "vlrouter.cli.registry_cmds",  # plugins, status, add-adapter, remove-adapter
    "vlrouter.cli.model_cmds",  # tiny-model
    "vlrouter.cli.train_cmds",  # build-dataset, embed, train, eval, retrain
    "vlrouter.cli.engine_cmds",  # route, act
    "vlrouter.cli.demo_cmds",  # demo
    "vlrouter.cli.modal_cmds",  # upload-dataset
    "vlrouter.cli.seed_cmds",  # import-seed-head
    "vlrouter.cli.serve_cmds",  # serve
    "vlrouter.cli.deploy_cmds",  # deploy
)

for _mod in COMMAND_MODULES:
    importlib.import_module(_mod)


def run() -> None:
    quiet_libraries()
    app()


if __name__ == "__main__":
    run()
