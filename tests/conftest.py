"""Shared fixtures. Everything offline; no installed plugins leak in; tiny models built once."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub or modal.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["VLROUTER_NO_ENTRY_POINTS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_modal_cfg = Path(tempfile.mkdtemp(prefix="vlrouter-modal-")) / "modal.toml"
_modal_cfg.write_text("")
os.environ["MODAL_CONFIG_PATH"] = str(_modal_cfg)
for _k in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE"):
    os.environ.pop(_k, None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3-VL saved like a hub checkpoint (built once per session)."""
    from vlrouter.core.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-vl")


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_dir):
    from vlrouter.core.encoder import Encoder

    return Encoder.load(str(tiny_model_dir), device="cpu")
