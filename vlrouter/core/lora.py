"""LoRA adapters in one PeftModel: checkpoint checks, loading every adapter beside one base, which touch vision.

Each registry adapter's PEFT checkpoint is loaded into ONE ``PeftModel`` under its
adapter name: LoRA adds small A/B matrices beside the frozen base weights, which exist
once. Errors name the adapter, its folder and the registry field it came from.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlrouter.core.errors import InputError, ModelLoadError, located
from vlrouter.core.paths import check_regular_file
from vlrouter.core.views import inner_vl_model

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"  # a torch.save pickle: never loaded


@dataclass(frozen=True)
class AdapterSource:
    """One PEFT checkpoint to load: its name, folder, and where it was declared (for errors)."""

    name: str
    path: Path
    file: str | Path | None = None  # e.g. registry.yaml
    field: str | None = None  # e.g. adapters[1].checkpoint
    line: int | None = None

    def err(self, problem: str, fix: str) -> ModelLoadError:
        return ModelLoadError(located(self.file, self.field, problem, fix=fix, line=self.line))


def _model_basename(name: str) -> str:
    """``Qwen/Qwen3-VL-8B-Instruct``, ``/models/Qwen3-VL-8B-Instruct/`` and a hub-cache snapshot
    ``.../models--Qwen--Qwen3-VL-8B-Instruct/snapshots/<sha>`` all give ``qwen3-vl-8b-instruct``."""
    s = str(name).strip().rstrip("/\\")
    m = re.search(r"models--[^/\\]+--([^/\\]+)[/\\]snapshots[/\\][^/\\]+$", s)
    if m:
        return m.group(1).lower()
    return re.split(r"[/\\]", s)[-1].lower()


def check_adapter_checkpoint(src: AdapterSource, base_model_names: Sequence[str] = ()) -> dict[str, Any]:
    """Refuse, before loading anything, a checkpoint that is missing or made for another base model.

    The base-model check is deliberately loose: it compares only the *basename* of
    ``adapter_config.json``'s ``base_model_name_or_path`` with the basenames of the
    registry's ``base_model`` (as written and as resolved), lowercased, and only when
    both are set. So ``Qwen/Qwen3-VL-8B-Instruct``, a local ``.../Qwen3-VL-8B-Instruct``
    folder and a hub-cache snapshot of it all match, while an adapter trained on
    ``Qwen3-VL-2B-Instruct`` is refused. A real mismatch of shapes is caught anyway
    when the weights load (see :func:`load_adapters`).
    """
    p = src.path
    if not p.exists():
        raise src.err(f"checkpoint folder for adapter {src.name!r} not found: {p}",
                      fix="train the adapter or fix the path (it resolves against the registry's folder)")
    cfg_path = p / "adapter_config.json"
    if not cfg_path.is_file():
        raise src.err(f"checkpoint for adapter {src.name!r} is not a PEFT adapter folder "
                      f"(no adapter_config.json): {p}", fix="point at the folder `save_pretrained` wrote")
    try:
        if cfg_path.stat().st_size > 1 << 20:
            raise ValueError("over 1 MiB, not a config")
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise TypeError("top level is not an object")
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise src.err(f"adapter {src.name!r}: {cfg_path} is not valid JSON ({e})",
                      fix="re-save the adapter with peft's save_pretrained") from None
    check_weights_file(src)
    made_for = cfg.get("base_model_name_or_path")
    names = [n for n in base_model_names if n]
    if made_for and names and _model_basename(made_for) not in {_model_basename(n) for n in names}:
        raise src.err(f"adapter {src.name!r} ({p}) was made for base model {made_for!r}, but the registry's "
                      f"base_model is {names[0]!r}",
                      fix=f"use an adapter trained on {names[0]!r}, or, if {made_for!r} is the same weights under "
                          "another name, load with check_base_model=False")
    return cfg


def check_weights_file(src: AdapterSource) -> None:
    """The adapter's weights are a whole ``adapter_model.safetensors`` (header read, coverage checked by
    safetensors, nothing loaded). A pickled ``adapter_model.bin`` is refused: loading one runs code."""
    from safetensors import SafetensorError, safe_open

    p = src.path
    st, pk = p / WEIGHTS_FILE, p / PICKLE_WEIGHTS
    if not st.exists():
        if pk.exists():
            raise src.err(f"adapter {src.name!r} has only {pk} (a pickle, which can run code when loaded); "
                          "vlrouter loads LoRA weights only from safetensors",
                          fix="where you trust the file, load the adapter with peft and save it again with "
                              "save_pretrained(..., safe_serialization=True), which writes adapter_model.safetensors")
        raise src.err(f"checkpoint for adapter {src.name!r} has no {WEIGHTS_FILE}: {p}",
                      fix="re-save the adapter with peft's save_pretrained")
    check_regular_file(st, what="adapter weights", where=src.file, field=src.field, error=ModelLoadError,
                       fix="point the checkpoint at the folder `save_pretrained` wrote", line=src.line)
    try:
        with safe_open(str(st), framework="pt") as f:
            names = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise src.err(f"adapter {src.name!r}: {st} is damaged or truncated ({e})",
                      fix="copy the adapter again, or re-save it with peft's save_pretrained") from None
    if not names:
        raise src.err(f"adapter {src.name!r}: {st} holds no weights", fix="re-save the adapter with peft's "
                                                                         "save_pretrained")


def _key_adapter(key: str) -> str | None:
    """The adapter a peft parameter name belongs to: the segment after ``lora_A``/``lora_B``/… ."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def missing_for(name: str, keys) -> list[str]:
    """The missing keys that are this adapter's own. peft lists every key whose text *contains* the new
    adapter's name, so ``settings`` beside ``settings-toggle`` (or ``a`` beside any ``lora_A``) would
    otherwise look like an adapter without weights."""
    return [str(k) for k in keys if _key_adapter(str(k)) == name]


def load_adapters(base, sources: Sequence[AdapterSource]):
    """Wrap ``base`` (modified in place) in ONE ``PeftModel`` holding every adapter by name.

    Errors name the adapter and its checkpoint folder: a shape mismatch (a LoRA made
    for a model with another hidden size), target modules the base does not have, or
    weights missing from the checkpoint.
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    if not sources:
        raise InputError(located(None, "adapters", "no adapters to load",
                                 fix="register one with `router add-adapter NAME`"))
    device = str(next(base.parameters()).device)
    model = None
    for src in sources:
        fix = "use an adapter trained for this base model (or retrain it on it)"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if model is None:
                    model = PeftModel.from_pretrained(base, str(src.path), adapter_name=src.name, is_trainable=False)
                    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
                else:
                    result = model.load_adapter(str(src.path), adapter_name=src.name, is_trainable=False,
                                                torch_device=device)
                    missing = missing_for(src.name, result.missing_keys)
            except RuntimeError as e:  # size mismatch from load_state_dict
                lines = str(e).splitlines()
                first = next((ln.strip() for ln in lines if "size mismatch" in ln), lines[0])
                raise src.err(f"adapter {src.name!r} ({src.path}) does not fit the base model: {first}", fix=fix) \
                    from None
            except (ValueError, KeyError, TypeError, OSError, SafetensorError) as e:
                raise src.err(f"adapter {src.name!r} ({src.path}) cannot be loaded: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}", fix=fix) from None
        for w in caught:  # keep peft's other warnings visible, except library-internal deprecations
            if "missing adapter keys" not in str(w.message) and "should not be contained in the prefix" not in \
                    str(w.message) and not issubclass(w.category, (FutureWarning, DeprecationWarning)):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if missing:
            raise src.err(f"adapter {src.name!r} ({src.path}) lacks weights for modules the config targets: "
                          f"{str(missing[0])[:200]}", fix="re-save the adapter with peft's save_pretrained")
    model.eval()
    model.requires_grad_(False)
    return model


def adapters_in(module) -> set[str]:
    """Names of the PEFT adapters that have weights somewhere inside ``module``."""
    found: set[str] = set()
    for m in module.modules():
        for attr in getattr(m, "adapter_layer_names", ()):
            v = getattr(m, attr, None)
            if hasattr(v, "keys"):
                found |= set(v.keys())
    return found


def vision_adapters(model) -> set[str]:
    """Adapters with weights in the vision tower (their image features differ from the base's)."""
    return adapters_in(inner_vl_model(model).visual)


# ---- a running PeftModel: one adapter in or out (a router promoted under a live engine) ------------

def checkpoint_stamp(path: Path) -> tuple:
    """(resolved folder, size and mtime of each checkpoint file): changes when the checkpoint is rewritten."""
    path = Path(path)
    files = []
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        try:
            st = (path / name).stat()
            files.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            pass
    return (os.path.realpath(path), tuple(files))


def load_adapter(model, src: AdapterSource) -> None:
    """Load one more PEFT checkpoint into a running ``PeftModel`` (errors as :func:`load_adapters`'s)."""
    model.__dict__.pop("_vlrouter_switchable", None)  # the fast switches walk the model again
    device = str(next(model.parameters()).device)
    fix = "use an adapter trained for this base model (or retrain it on it)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            result = model.load_adapter(str(src.path), adapter_name=src.name, is_trainable=False, torch_device=device)
        except RuntimeError as e:  # size mismatch from load_state_dict
            first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            raise src.err(f"adapter {src.name!r} ({src.path}) does not fit the base model: {first}", fix=fix) from None
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise src.err(f"adapter {src.name!r} ({src.path}) cannot be loaded: {type(e).__name__}: {e}",
                          fix=fix) from None
    if result.missing_keys:
        raise src.err(f"adapter {src.name!r} ({src.path}) lacks weights for modules the config targets: "
                      f"{str(result.missing_keys[0])[:200]}", fix="re-save the adapter with peft's save_pretrained")
    if model.active_adapter not in model.peft_config:  # peft still names a deleted last adapter as the active one,
        model.set_adapter(src.name, inference_mode=True)  # and every get_base_model() would raise KeyError


def delete_adapter(model, name: str) -> None:
    """Drop one adapter's LoRA weights from a running ``PeftModel`` (another adapter becomes the active one)."""
    model.__dict__.pop("_vlrouter_switchable", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns when the active adapter is deleted: we never rely on it
        model.delete_adapter(name)


def _switchable_layers(model) -> list | None:
    """Every LoRA layer of ``model``, or None when something besides LoRA layers takes part (``modules_to_save``
    wrappers, a merged layer, weights that train): then only peft's own, slower switches are right. Walking the
    model is itself O(adapters), so the answer is kept on the model until its set of adapters changes."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    key = tuple((name, id(config)) for name, config in model.peft_config.items())
    kept = getattr(model, "_vlrouter_switchable", None)
    if kept is not None and kept[0] == key:
        return kept[1]
    layers: list | None = []
    for m in model.modules():
        if isinstance(m, AuxiliaryTrainingWrapper):
            layers = None
            break
        if isinstance(m, BaseTunerLayer):
            if m.merged or any(p.requires_grad for p in m.parameters()):
                layers = None
                break
            layers.append(m)
    model._vlrouter_switchable = (key, layers)
    return layers


@contextmanager
def adapters_off(model) -> Iterator[None]:
    """The exact base model inside the block, as ``model.disable_adapter()``, in time independent of the adapter count.

    peft's context walks every adapter of every LoRA layer twice (requires_grad bookkeeping, a status report), so
    with 256 adapters resident a routing pass took 10x longer. Here every weight is frozen: the same per-layer flag
    is flipped and restored, nothing else.
    """
    layers = _switchable_layers(model)
    if layers is None:
        with model.disable_adapter():
            yield
        return
    before = [m._disable_adapters for m in layers]
    was = model._adapters_disabled
    for m in layers:
        m._disable_adapters = True
    model._adapters_disabled = True
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._disable_adapters = b
        model._adapters_disabled = was


def activate(model, name: str) -> None:
    """``model.set_adapter(name, inference_mode=True)`` in time independent of the adapter count (frozen weights:
    only the active adapter each LoRA layer reads is set, as peft's own switch ends up setting it)."""
    layers = _switchable_layers(model)
    if layers is None or name not in model.peft_config:
        model.set_adapter(name, inference_mode=True)  # peft's own errors for an unknown name
        return
    for m in layers:
        m._active_adapter = [name]
    model.base_model.active_adapter = name
    model.active_adapter = name


def touches_vision(src: AdapterSource) -> bool:
    """Whether a checkpoint has LoRA weights inside the vision tower (from its key names; nothing is loaded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(src.path / WEIGHTS_FILE), framework="pt") as f:
            return any(".visual." in k for k in f.keys())  # noqa: SIM118 (safe_open: no __iter__)
    except (SafetensorError, OSError, ValueError):
        return False  # the load reports a damaged file, with its path
