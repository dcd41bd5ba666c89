"""registry.yaml's scale-out sections: ``engine:`` (adapter residency, where generation runs) and ``serve:`` (Modal).

Both are strict like the rest of registry.yaml (unknown keys are errors naming the line).
Cross-field problems are raised as ``"engine.vllm_url: …"`` so the registry loader reports
the field and its line (:meth:`vlrouter.core.registry.Registry._validate`).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GENERATIONS = ("local", "vllm")
# The fix a registry error about one of these fields carries (keyed by its last two path parts).
SECTION_FIXES = {
    ("engine", "vllm_url"): "write the vLLM server's address under engine:, e.g. `vllm_url: http://127.0.0.1:8001`, "
                            "or set engine.generation: local",
    ("engine", "max_loaded_adapters"): "a whole number of adapters >= 1, or remove the key to keep every adapter "
                                       "loaded",
    ("serve", "min_containers"): "lower serve.min_containers or raise serve.max_containers",
    ("serve", "scaledown_window"): "seconds between 2 and 3600 (Modal's limits)",
}


class Strict(BaseModel):
    """A section people write: unknown keys, NaN and infinity are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class EngineSection(Strict):
    """How the engine holds adapters and where it generates.

    ``max_loaded_adapters``: at most this many LoRAs in the model at once (None: all);
    the others are loaded on first use, the least recently used evicted. The router head
    always scores every adapter. ``generation: vllm`` sends generation to a vLLM
    OpenAI-compatible server at ``vllm_url`` (routing stays in-process on the base model,
    no LoRA weights are loaded here).
    """

    max_loaded_adapters: int | None = Field(None, ge=1, le=100_000)
    generation: Literal["local", "vllm"] = "local"
    vllm_url: str | None = None  # e.g. http://127.0.0.1:8001 (the server's base URL; a trailing /v1 is fine)
    vllm_timeout: float = Field(120.0, gt=0, le=3600)  # seconds per request to vLLM
    vllm_model: str | None = None  # the base model's name on the vLLM server (default: asked from /v1/models)
    vllm_lora_dir: str | None = None  # where the vLLM server sees adapters, as DIR/<name> (add-adapter's path)

    @field_validator("vllm_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        u = urlparse(v.strip())
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"{v!r} is not an http(s) URL like http://127.0.0.1:8001")
        return v.strip()

    @model_validator(mode="after")
    def _needs_url(self) -> EngineSection:
        if self.generation == "vllm" and not self.vllm_url:
            raise ValueError("engine.vllm_url: required when engine.generation is vllm (the vLLM server's address, "
                             "e.g. http://127.0.0.1:8001)")
        return self


class ServeSection(Strict):
    """``router deploy --backend modal``: the GPU and autoscaling of the serving containers."""

    gpu: str = "H100"
    min_containers: int = Field(0, ge=0, le=1000)  # kept warm even when idle (billed while up)
    max_containers: int = Field(1, ge=1, le=1000)
    scaledown_window: int = Field(300, ge=2, le=3600)  # seconds an idle container stays up
    concurrency: int = Field(8, ge=1, le=1000)  # requests one container takes at once (batched together)
    timeout: int = Field(600, ge=10, le=86_400)  # seconds per request (and for a container's start-up)

    @model_validator(mode="after")
    def _bounds(self) -> ServeSection:
        if self.min_containers > self.max_containers:
            raise ValueError(f"serve.min_containers: {self.min_containers} is above serve.max_containers "
                             f"({self.max_containers})")
        return self
