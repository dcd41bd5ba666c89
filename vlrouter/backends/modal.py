"""The Modal backend plugin: processing on CPU containers, embedding and training on a GPU.

``import modal`` happens only when this backend is used, so the CLI stays fast and
works without Modal credentials. The app itself is defined in ``modal_app.py``.
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
