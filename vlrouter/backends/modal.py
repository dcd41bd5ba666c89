"""The Modal training backend plugin: processing on CPU containers, embedding on a GPU, fitting on a CPU.

``import modal`` happens only when this backend runs, so the CLI stays fast and works
without Modal credentials. The app (functions, image, volumes, resources) is defined in
``modal_app.py``; ``modal_run.py`` drives it from this machine (credentials, upload, the
remote steps, downloading the candidate). README: "Training on Modal".
"""

from __future__ import annotations

from vlrouter.backends.modal_run import retrain_modal
from vlrouter.plugins.hookspecs import hookimpl


@hookimpl
def register_backends(register):
    register("modal", retrain_modal)
