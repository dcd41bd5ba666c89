"""The server's limits and switches, in one object: what `router serve`'s flags set."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from vlrouter.core.errors import InputError, located

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    """Every knob of :func:`vlrouter.serve.app.create_app`; defaults are `router serve`'s defaults."""

    api_key: str | None = None  # when set, every endpoint but /healthz, /readyz and the page needs the Bearer key
    max_batch_size: int = 8  # requests generated in one act_batch
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_queue: int = 64  # requests waiting for the model; beyond it: 503 + Retry-After
    max_body_bytes: int = 20 * MIB  # request body; beyond it: 413
    max_image_bytes: int = 10 * MIB  # one decoded image; beyond it: 413
    max_prompt_tokens: int | None = None  # tokens of the instruction; beyond: 400 (None: router.max_prompt_tokens)
    max_new_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 64  # max_tokens when a request gives none
    request_timeout_s: float = 120.0  # queue + generation; beyond it: 504
    retry_after_s: int = 1  # the Retry-After a 503 carries
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: only data: URLs)
    remote_image_timeout_s: float = 10.0
    reload_interval_s: float = 1.0  # how often the live router symlink is checked; 0 = never (POST /admin/reload)
    decision_log: Path | None = None  # JSONL file: one line per routing decision
    decision_images: Path | None = None  # folder: each decided screenshot, named by its sha256

    def __post_init__(self) -> None:
        positive = ("max_batch_size", "max_queue", "max_body_bytes", "max_image_bytes", "max_prompt_tokens",
                    "max_new_tokens", "default_max_tokens", "request_timeout_s", "remote_image_timeout_s")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in positive and value is not None and not value > 0:
                raise InputError(located(None, f.name, f"must be > 0, got {value!r}", fix="pass a positive value"))
        if self.max_wait_ms < 0 or self.reload_interval_s < 0 or self.retry_after_s < 0:
            raise InputError("serve settings max_wait_ms, reload_interval_s and retry_after_s must be >= 0")
        if self.default_max_tokens > self.max_new_tokens:
            raise InputError(f"default_max_tokens {self.default_max_tokens} is over max_new_tokens "
                             f"{self.max_new_tokens} (fix: raise --max-new-tokens)")
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("the API key is empty (fix: pass a non-empty --api-key, or none)")
