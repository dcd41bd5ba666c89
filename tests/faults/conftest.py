"""Fixtures for the fault tests: one engine over the tiny model, shared by the security and load tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import engine_helpers as H


@pytest.fixture(scope="session")
def engine_project(tmp_path_factory, tiny_model_dir, tiny_encoder) -> Path:
    """Three LoRA adapters + registry.yaml + a trained router (engine_helpers.make_project)."""
    return H.make_project(tmp_path_factory.mktemp("faults-engine"), tiny_model_dir, encoder=tiny_encoder)


@pytest.fixture(scope="session")
def engine(engine_project):
    from vlrouter.core.engine import Engine

    return Engine.from_registry(engine_project, device="cpu")
