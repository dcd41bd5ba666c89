"""The Modal backend plugin: processing on CPU containers, embedding and training on a GPU.

``import modal`` happens only when this backend is used, so the CLI stays fast and
works without Modal credentials. The app (functions, image, volumes, resources) is
defined in ``modal_app.py``; ``modal_run.py`` drives it from this machine (credentials,
upload, the remote steps, downloading the candidate). README: "Training on Modal".
"""

from __future__ import annotations

from vlrouter import hookimpl
from vlrouter.backends.base import RetrainRequest, RetrainResult


class ModalBackend:
    name = "modal"

    def retrain(self, request: RetrainRequest) -> RetrainResult:
        from vlrouter.backends.modal_run import retrain_modal

        return retrain_modal(request)


@hookimpl
def register_backends(register):
    register("modal", ModalBackend())
