"""How much memory a base model's weights take: from a local folder's safetensors headers, or known Qwen3-VL sizes.

Used to refuse a GPU that cannot hold the configured base model before anything is
uploaded or started (``router retrain --backend modal --gpu T4`` for an 8B model). A local
folder is measured exactly (parameter counts from the safetensors headers: 8 bytes of
length, then a JSON header; no tensor is read). A hub id is matched against the published
Qwen3-VL sizes (approximate parameter counts); anything else is unknown (None), and the
caller skips the check and says so.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

# Approximate parameter counts of the published Qwen3-VL checkpoints (Instruct and Thinking), vision tower included.
KNOWN_PARAMS = {
    "qwen3-vl-2b": 2.13e9,
    "qwen3-vl-4b": 4.44e9,
    "qwen3-vl-8b": 8.77e9,  # 17.5 GB in bf16
    "qwen3-vl-32b": 33.4e9,
    "qwen3-vl-30b-a3b": 31.1e9,  # mixture of experts: every expert is resident
    "qwen3-vl-235b-a22b": 236e9,
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MAX_HEADER = 100 << 20  # a safetensors header is JSON of names and shapes: megabytes at most


def _header_params(path: Path) -> int:
    """Parameters listed in one safetensors file's header; ValueError naming the file when it has no such header
    (shorter than 8 bytes, an absurd length, not a JSON object)."""
    not_safetensors = ValueError(f"{path}: not a safetensors file")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise not_safetensors
        (n,) = struct.unpack("<Q", head)
        if not 0 < n <= MAX_HEADER:
            raise not_safetensors
        try:
            header = json.loads(f.read(n))
        except ValueError:  # not JSON, or not UTF-8
            raise not_safetensors from None
    if not isinstance(header, dict):
        raise not_safetensors
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def parameter_count(base_model: str) -> tuple[float | None, str]:
    """``(parameters, how we know)``: counted from a local folder's safetensors headers, looked up for a known
    Qwen3-VL hub id, or ``(None, why not)``."""
    p = Path(base_model)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            return None, f"{p} holds no *.safetensors"
        try:
            return float(sum(_header_params(f) for f in files)), f"counted in {p.name}/*.safetensors"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return None, f"cannot read the safetensors headers ({e})"
    name = base_model.rstrip("/").split("/")[-1].lower()
    m = re.match(r"(qwen3-vl-\d+b(?:-a\d+b)?)", name)
    if m and m.group(1) in KNOWN_PARAMS:
        return KNOWN_PARAMS[m.group(1)], f"the published size of {m.group(1)} (approximate)"
    return None, f"{base_model!r} is not a local folder nor a known Qwen3-VL size"


def weight_bytes(base_model: str, dtype: str = "bfloat16") -> tuple[int | None, str]:
    """Bytes of the weights in ``dtype`` (``auto`` means bfloat16, what a GPU runs), and how we know."""
    params, how = parameter_count(base_model)
    if params is None:
        return None, how
    return int(params * DTYPE_BYTES.get(dtype, 2)), how
