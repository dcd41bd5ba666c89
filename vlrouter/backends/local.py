"""The default training backend: build the routing dataset, embed and fit a candidate, all in this process."""

from __future__ import annotations

from vlrouter.core.recipe import Candidate, RetrainRequest, build_dataset, train_candidate
from vlrouter.plugins.hookspecs import hookimpl


def retrain_local(request: RetrainRequest) -> Candidate:
    """Steps 1-3 of the recipe on this machine's CPU or GPU (the gate runs in the caller)."""
    dataset = build_dataset(request.registry, request.options, request.progress)
    return train_candidate(dataset, request.registry, request.options, progress=request.progress)


@hookimpl
def register_backends(register):
    register("local", retrain_local)
