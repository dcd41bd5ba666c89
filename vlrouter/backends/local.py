"""The default backend: every step runs in this process (CPU or a local GPU)."""

from __future__ import annotations

from vlrouter import hookimpl
from vlrouter.backends.base import RetrainRequest, RetrainResult


class LocalBackend:
    name = "local"

    def retrain(self, request: RetrainRequest) -> RetrainResult:
        from vlrouter.core.train import retrain_local

        return retrain_local(request)


@hookimpl
def register_backends(register):
    register("local", LocalBackend())
