"""Test helpers for the engine: real PEFT LoRA checkpoints, a registry, a trained router.

Nothing here depends on the training pipeline (``core.data/features/train``): routers
are written directly with :func:`vlrouter.core.head.save_router` from a head fitted in
a few hundred steps on features computed with the encoder.

Import from a test module with::

        import engine_helpers
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

# LoRA on the language model only (the vision tower stays the base's): the common case.
LM_TARGETS = r".*language_model.*\.(q_proj|v_proj)"
# Also on the vision tower's attention: the engine must then re-encode the image.
VISION_TARGETS = r".*(language_model.*\.(q_proj|v_proj)|visual.*\.qkv)"

NAMES = ["calendar", "claim-window", "provider-select"]

# Distinct screens and instructions per adapter, so a head separates them.
_COLORS = {"calendar": (220, 40, 40), "claim-window": (30, 170, 60), "provider-select": (40, 60, 210)}
_PROMPTS = {
    "calendar": ["Click March 29 in the calendar", "Select the 3rd of December"],
    "claim-window": ["Type the claim number into the form", "Press Submit claim"],
    "provider-select": ["Select Dr. Smith from the provider list", "Choose the first clinic"],
}


def screen(name: str, variant: int = 0, size=(320, 240)) -> Image.Image:
    """A synthetic screenshot for ``name``: a coloured background with a few boxes."""
    color = _COLORS.get(name, (120, 120, 120))
    img = Image.new("RGB", size, color)
    d = ImageDraw.Draw(img)
    for k in range(3 + variant):
        x = 20 + 60 * k
        d.rectangle([x, 40 + 10 * variant, x + 40, 80 + 10 * variant], fill=(255 - color[0], 255 - color[1], 200))
    return img


def samples(names=NAMES) -> list[tuple[Image.Image, str, str]]:
    """``(image, prompt, adapter)`` routing samples, two per adapter."""
    out = []
    for n in names:
        for v, p in enumerate(_PROMPTS.get(n, [f"Do the {n} task", f"Use {n} now"])):
            out.append((screen(n, v), p, n))
    return out


def make_lora_adapters(model_dir: str | Path, out_root: str | Path, names, *, target_modules: str | list = LM_TARGETS,
                       rank: int = 4, seed: int = 0) -> dict[str, Path]:
    """One PEFT LoRA checkpoint per name under ``out_root/NAME`` (random non-zero A and B).

    ``init_lora_weights=False`` makes B non-zero, so each adapter changes the model's
    outputs (a fresh LoRA is a no-op). Each name gets its own seed.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    out = {}
    for i, name in enumerate(names):
        base = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
        torch.manual_seed(seed + 1000 * (i + 1))
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=target_modules,
                         init_lora_weights=False)
        pm = get_peft_model(base, cfg)
        with torch.no_grad():  # scale B up a little so adapters visibly change greedy outputs
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(4.0)
        d = Path(out_root) / name
        pm.save_pretrained(str(d))
        out[name] = d
    return out


def features(encoder, images, prompts, views=("mean",), layer: int = -1):
    """What a router reading ``views`` at ``layer`` sees for these inputs (the training features)."""
    from vlrouter.core.views import Representation, resolve_layer

    resolved = resolve_layer(layer, encoder.num_layers)
    return Representation(tuple(views), resolved).features(encoder.embed(images, prompts, [resolved]))


def write_registry(root: str | Path, base_model: str | Path, checkpoints: dict[str, str | Path], *,
                   router_dir: str = "runs/router", fallback: str = "base", min_confidence: float = 0.0,
                   pooling: str = "mean", layer: int | str = -1, extra_adapters: dict[str, str] | None = None) -> Path:
    """Write ``root/registry.yaml`` listing ``checkpoints`` (name -> folder) in order."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        f"base_model: {base_model}",
        "router:",
        f"  dir: {router_dir}",
        f"  pooling: {pooling}",
        f"  layer: {layer}",
        f"  min_confidence: {min_confidence}",
        f"  fallback: {fallback}",
        "adapters:",
    ]
    for name, ck in {**checkpoints, **(extra_adapters or {})}.items():
        lines += [f"  - name: {name}", f"    dataset: data/{name}/train.jsonl", f"    checkpoint: {ck}"]
    path = root / "registry.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def train_router(registry_path: str | Path, *, encoder=None, names=None, temperature: float = 1.0,
                 steps: int = 300, seed: int = 0, adapters_in_meta=None, base_model_in_meta: str | None = None):
    """Fit a linear head on :func:`samples` features and save it at the registry's router dir.

    ``adapters_in_meta`` / ``base_model_in_meta`` override what router.json records
    (to make stale routers). Returns ``(head, meta)``.
    """
    import torch

    from vlrouter.core.encoder import Encoder
    from vlrouter.core.head import HeadShape, build_head
    from vlrouter.core.registry import Registry
    from vlrouter.core.store import RouterMeta, save_router
    from vlrouter.core.views import Representation, resolve_layer

    reg = Registry.load(registry_path)
    names = list(names or reg.adapter_names)
    views = reg.model.router.views or ["mean"]
    setting = reg.model.router.layer
    if encoder is None:
        encoder = Encoder.load(reg.base_model, device="cpu")
    layer = resolve_layer(-1 if setting == "auto" else int(setting), encoder.num_layers)
    rep = Representation(tuple(views), layer)
    data = samples(names)
    feats = rep.features(encoder.embed([s[0] for s in data], [s[1] for s in data], [layer]))
    labels = torch.tensor([names.index(s[2]) for s in data])
    torch.manual_seed(seed)
    shape = HeadShape(kind="linear", in_dim=feats.shape[1], num_labels=len(names))
    head = build_head(shape)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    final_loss = float(loss.detach())
    head.eval()
    with torch.no_grad():
        acc = float((head(feats).argmax(-1) == labels).float().mean())
    meta = RouterMeta(adapters=list(adapters_in_meta or names), base_model=base_model_in_meta or reg.model.base_model,
                      pooling=list(views), layer=layer, num_layers=encoder.num_layers, hidden_size=encoder.hidden_size,
                      head=shape, temperature=temperature, best_loss=final_loss, best_acc=acc)
    save_router(reg.router_dir, head, meta)
    return head, meta


def make_project(root: str | Path, model_dir: str | Path, *, names=NAMES, target_modules=LM_TARGETS,
                 encoder=None, **registry_kwargs) -> Path:
    """Adapters + registry.yaml + a trained router under ``root``. Returns the registry path."""
    root = Path(root)
    cks = make_lora_adapters(model_dir, root / "checkpoints", names, target_modules=target_modules)
    reg = write_registry(root, model_dir, {n: f"checkpoints/{n}" for n in cks}, **registry_kwargs)
    train_router(reg, encoder=encoder)
    return reg


def promote_router(registry_path: str | Path, checkpoints: dict[str, str | Path], *, encoder=None,
                   update_registry: bool = True) -> Path:
    """Train a router over ``checkpoints`` (name -> folder) and promote it, as ``router add-adapter`` does.

    The candidate is written into a fresh version folder beside the live router and
    swapped in with :func:`vlrouter.core.store.promote` (the symlink swap); then, when
    ``update_registry``, registry.yaml is rewritten to list the same adapters -- in that
    order, like ``add-adapter`` (promotion first, registry save after). Returns the new
    version folder.
    """
    import shutil
    import tempfile

    from vlrouter.core.registry import Registry
    from vlrouter.core.store import new_version_dir, promote

    reg = Registry.load(registry_path)
    live = reg.router_dir  # a plain folder (make_project) is moved into the versions folder by promote()
    cand = new_version_dir(live)
    scratch = Path(tempfile.mkdtemp(prefix="vlrouter-promote-"))
    cks = {n: str(reg.resolve(p)) for n, p in checkpoints.items()}
    write_registry(scratch, reg.base_model, cks, router_dir=str(cand), pooling=reg.model.router.pooling,
                   layer=reg.model.router.layer)
    try:
        train_router(scratch / "registry.yaml", encoder=encoder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    promote(cand, live)
    if update_registry:
        r = reg.model.router
        write_registry(Path(registry_path).parent, reg.model.base_model, checkpoints, router_dir=str(r.dir),
                       fallback=r.fallback, min_confidence=r.min_confidence, pooling=r.pooling, layer=r.layer)
    return cand
