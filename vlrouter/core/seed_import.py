"""Import the seed's ``router-head.pt`` into a vlrouter router folder, for inspection or migration.

The seed saved its head with ``torch.save({"state_dict": ..., "adapters": [...],
"base_model_id": ..., "best_loss": ..., "best_acc": ...})`` -- a pickle. vlrouter never
unpickles anything that could run code: the file is read with
``torch.load(path, weights_only=True)`` only, whose unpickler builds tensors, dicts,
lists and numbers and refuses every other object (a malicious ``__reduce__`` never runs).

The state dict of a single ``nn.Linear`` (``weight``/``bias``), or an ``nn.Sequential``
holding one Linear, maps onto vlrouter's linear head; a Sequential of two Linears
(hidden layer) maps onto the ``mlp`` head (GELU assumed between them). vlrouter's heads
start with a per-feature ``Standardize`` whose buffers (``0.mean``/``0.std``) are set to
0 and 1 here, so the imported head computes exactly the seed's ``Linear(x)``.

It does NOT route like the seed did, and it does not route well: the seed pooled
``hidden_states[-1][:, 0, :]`` -- token 0, which under causal attention is the same
for every input -- so its head was trained on a constant feature. vlrouter pools
``mean`` or ``last`` (``pooling`` must be chosen explicitly; neither is what the seed's
head saw). router.json records all this under ``metrics`` (``needs_retraining: true``,
``seed_pooling: "token0"``, a warning); run ``router retrain`` for a router that works.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vlrouter.core.errors import CheckpointError, InputError, located
from vlrouter.core.head import HeadShape, build_head
from vlrouter.core.paths import check_regular_file
from vlrouter.core.registry import NAME_RE
from vlrouter.core.store import RouterMeta, load_router, save_router

SEED_POOLING = "token0"
WARNING = ("imported from the seed's router-head.pt: the seed pooled hidden_states[-1][:, 0, :] (token 0), which is "
           "the same for every input under causal attention, so this head was trained on a constant feature and "
           "does not route; it exists for inspection and migration. Retrain with `router retrain`.")


def _load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects."""
    import pickle

    import torch

    if not path.exists():
        raise CheckpointError(located(path, None, "seed checkpoint not found", fix="check the path"))
    if path.is_dir():
        raise CheckpointError(located(path, None, "is a folder, not a router-head.pt file",
                                      fix="point at the .pt file the seed's router_train.py wrote"))
    check_regular_file(path, what="seed checkpoint", error=CheckpointError,
                       fix="point at the .pt file the seed's router_train.py wrote")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).partition("WeightsUnpickler error:")[2].split("\n\nCheck the documentation")[0]
        detail = " ".join(detail.split()) or " ".join(str(e).split())
        found = re.match(r"Unsupported global: GLOBAL (\S+)", detail)
        if found:  # an object the file would construct or call on load: refused, nothing ran
            raise CheckpointError(located(path, None, f"refused: the pickle calls or builds {found.group(1)}, which "
                                          "could run code; only tensors, lists, dicts and numbers are loaded "
                                          "(torch.load weights_only=True), and nothing in the file was executed",
                                          fix="re-save the head as plain tensors + lists + numbers, e.g. torch.save("
                                              "{'state_dict': head.state_dict(), 'adapters': [...]})")) from None
        raise CheckpointError(located(path, None, f"cannot read it as a torch checkpoint with the weights-only "
                                      f"loader ({_safe_detail(detail)})",
                                      fix="point at the router-head.pt the seed wrote")) from None
    except Exception as e:  # not a torch file, truncated zip, …
        raise CheckpointError(located(path, None, f"cannot read it as a torch checkpoint "
                                      f"({type(e).__name__}: {_safe_detail(str(e))})",
                                      fix="point at the router-head.pt the seed wrote")) from None


def _safe_detail(text: str) -> str:
    """torch's message, on one line and cut before its advice to retry with ``weights_only=False`` (which
    runs the pickle's code): vlrouter never suggests that."""
    text = " ".join(text.split())
    text = re.split(r"(?i)(weights only load failed|re-running `?torch\.load|weights_only`? (set to|=) ?`?false)",
                    text)[0]
    return text.strip(" .;:,(")[:200] or "not a weights-only checkpoint"


def _linear_layers(state: dict[str, Any], where: Path) -> tuple[list[tuple[Any, Any]], list[str]]:
    """The (weight, bias) pairs of the Linear layers in ``state``, in module order; and the keys seen."""
    import torch

    keys = sorted(state)
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(located(where, "state_dict", f"entry {k!r} is not a named tensor",
                                          fix="save head.state_dict()"))
    names = {k: k for k in keys}
    while True:  # a head saved from inside a wrapper: strip a shared non-numeric prefix ("module.", "head.", …)
        firsts = {n.split(".", 1)[0] for n in names.values()}
        if len(firsts) != 1 or not all("." in n for n in names.values()) or next(iter(firsts)).isdigit():
            break
        names = {k: n.split(".", 1)[1] for k, n in names.items()}
    modules: dict[str, dict[str, Any]] = {}
    for k, short in names.items():
        mod, _, param = short.rpartition(".")
        modules.setdefault(mod, {})[param] = state[k]
    if not all(re.fullmatch(r"\d*", m) for m in modules):
        raise CheckpointError(located(where, "state_dict", f"not a Linear or nn.Sequential state dict (keys: "
                                      f"{', '.join(keys[:8])})", fix="import a head made of nn.Linear layers"))
    layers = []
    for mod in sorted(modules, key=lambda m: int(m) if m else -1):
        params = modules[mod]
        w, b = params.get("weight"), params.get("bias")
        extra = set(params) - {"weight", "bias"}
        if w is None or w.ndim != 2 or (b is not None and b.shape != (w.shape[0],)) or extra:
            shapes = ", ".join(f"{mod + '.' if mod else ''}{n} {tuple(t.shape)}" for n, t in sorted(params.items()))
            raise CheckpointError(located(where, "state_dict", f"layer {mod or '(top)'!r} is not an nn.Linear "
                                          f"({shapes}); only Linear layers can be imported (a LayerNorm or other "
                                          "layer has no counterpart in vlrouter's head)",
                                          fix="retrain with `router retrain` instead"))
        layers.append((w, b))
    return layers, keys


def import_seed_head(pt_path: str | Path, out_dir: str | Path, *, pooling: str, base_model: str | None = None,
                     layer: int = -1, adapters: list[str] | None = None) -> Path:
    """Convert a seed ``router-head.pt`` into ``out_dir`` (head.safetensors + router.json); return it.

    ``pooling`` (``mean`` or ``last``) has no default: the seed pooled token 0, which
    vlrouter does not do, so no choice reproduces the seed. ``base_model`` defaults to
    the checkpoint's ``base_model_id``; ``adapters`` to its ``adapters`` list (label
    order). ``out_dir`` must not exist (or be an empty folder); it is written through a
    temp folder and renamed into place, so a crash leaves no half router.
    """
    import torch

    src, out = Path(pt_path), Path(out_dir)
    if pooling not in ("mean", "last"):
        raise InputError(located(None, "--pooling", f"must be 'mean' or 'last', got {pooling!r}",
                                 fix="pass --pooling mean or --pooling last; the seed's token-0 pooling is not "
                                     "offered: it is constant"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(located(out, None, "already exists and is not an empty folder; nothing was written",
                                 fix="choose a new --out folder"))
    ckpt = _load_weights_only(src)
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        state = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, ckpt = ckpt, {}  # a bare state dict
    else:
        what = f"keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(located(src, None, f"not a seed router checkpoint ({what}; expected a dict with "
                                      "'state_dict' and 'adapters')", fix="point at the seed's router-head.pt"))
    if not isinstance(state, dict) or not state:
        raise CheckpointError(located(src, "state_dict", "missing or empty", fix="point at the seed's router-head.pt"))
    layers, keys = _linear_layers(state, src)
    if len(layers) not in (1, 2):
        raise CheckpointError(located(src, "state_dict", f"{len(layers)} Linear layers; vlrouter's heads have one "
                                      "(linear) or two (mlp)", fix="retrain with `router retrain` instead"))
    for i in range(1, len(layers)):
        if layers[i][0].shape[1] != layers[i - 1][0].shape[0]:
            raise CheckpointError(located(src, "state_dict", "the Linear layers' shapes do not chain "
                                          f"({tuple(layers[i - 1][0].shape)} then {tuple(layers[i][0].shape)})",
                                          fix="retrain with `router retrain` instead"))
    for w, b in layers:
        if not (w.is_floating_point() and torch.isfinite(w).all() and (b is None or torch.isfinite(b).all())):
            raise CheckpointError(located(src, "state_dict", "weights are not finite floating-point numbers",
                                          fix="retrain with `router retrain` instead"))
    in_dim, num_labels = int(layers[0][0].shape[1]), int(layers[-1][0].shape[0])

    seed_adapters = ckpt.get("adapters")
    if adapters is None:
        if not (isinstance(seed_adapters, (list, tuple)) and all(isinstance(a, str) for a in seed_adapters)):
            raise InputError(located(src, "adapters", "the checkpoint has no adapter name list",
                                     fix="pass --adapters a,b,c in label order"))
        adapters = list(seed_adapters)
    adapters = [a.strip() for a in adapters]
    bad = [a for a in adapters if not NAME_RE.match(a)]
    if bad or len(set(adapters)) != len(adapters):
        raise InputError(located(src, "adapters", f"adapter names {adapters} must be distinct and match "
                                 "[a-z0-9][a-z0-9-]*", fix="pass --adapters with the registry's names, in label order"))
    if len(adapters) != num_labels:
        raise InputError(located(src, "adapters", f"{len(adapters)} adapter names for a head with {num_labels} "
                                 "outputs", fix="pass --adapters with one name per output, in label order"))
    base = base_model or ckpt.get("base_model_id")
    if not isinstance(base, str) or not base.strip():
        raise InputError(located(src, "base_model_id", "the checkpoint names no base model",
                                 fix="pass --base-model, e.g. Qwen/Qwen3-VL-8B-Instruct"))

    hidden = int(layers[0][0].shape[0]) if len(layers) == 2 else 0
    shape = HeadShape(kind="mlp" if hidden else "linear", in_dim=in_dim, hidden=hidden, num_labels=num_labels)
    head = build_head(shape)
    with torch.no_grad():
        head[0].mean.zero_()
        head[0].std.fill_(1.0)
        targets = [head[1]] if not hidden else [head[1], head[4]]
        for lin, (w, b) in zip(targets, layers):
            lin.weight.copy_(w.float())
            if b is None:
                lin.bias.zero_()
            else:
                lin.bias.copy_(b.float())

    def _num(key: str) -> float | None:
        v = ckpt.get(key)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    metrics: dict[str, Any] = {
        "imported_from": str(src.resolve()),
        "needs_retraining": True,
        "seed_pooling": SEED_POOLING,
        "warning": WARNING,
        "seed_keys": keys,
        # The seed's numbers were measured on token-0 features: kept here, not as this head's best_loss/best_acc.
        "seed_best_loss": _num("best_loss"),
        "seed_best_acc": _num("best_acc"),
    }
    if adapters != seed_adapters:
        metrics["seed_adapters"] = list(seed_adapters) if isinstance(seed_adapters, (list, tuple)) else None
    if hidden:
        metrics["note"] = "two Linear layers mapped onto the mlp head (Linear, GELU, Dropout, Linear): GELU is assumed"
    meta = RouterMeta(adapters=adapters, base_model=base, pooling=pooling, layer=layer, hidden_size=in_dim, head=shape,
                      temperature=1.0, metrics=metrics)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    try:
        save_router(tmp, head, meta)
        load_router(tmp)  # what was written loads back
        os.chmod(tmp, 0o755)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
