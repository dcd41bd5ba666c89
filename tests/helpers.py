"""Shared test helpers: synthetic adapter datasets and registries (offline, seconds to build).

:func:`make_dataset` renders small screenshots that look different per task (layout,
colours, shapes) and differ per sample (positions, sizes, a little noise), with
task-specific instructions, so a tiny random encoder already separates the tasks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = (160, 120)

TASKS = ("calendar", "claim-window", "provider-select", "settings", "search")

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_NAMES = ["Smith", "Nguyen", "Garcia", "Okafor", "Ivanova", "Kim", "Rossi", "Haddad"]


def _prompt(task: str, rng: random.Random) -> tuple[str, str]:
    x, y = rng.randrange(10, 150), rng.randrange(10, 110)
    if task == "calendar":
        return f"Click {rng.choice(_MONTHS)} {rng.randrange(1, 29)} in the calendar", f"click(x={x}, y={y})"
    if task == "claim-window":
        return f"Claim the delivery window {rng.randrange(8, 18)}:00", f"click(x={x}, y={y})"
    if task == "provider-select":
        return f"Select Dr. {rng.choice(_NAMES)} from the provider list", f"select(x={x}, y={y})"
    if task == "settings":
        return f"Turn {'on' if rng.random() < 0.5 else 'off'} notifications", f"toggle(x={x}, y={y})"
    return f"Search for {rng.choice(_NAMES).lower()} results", f"type(text='{rng.choice(_NAMES)}')"


def render(task: str, rng: random.Random) -> Image.Image:
    """One synthetic screenshot for ``task``: a distinct layout and palette per task."""
    w, h = SIZE
    jitter = lambda c: tuple(max(0, min(255, v + rng.randrange(-20, 21))) for v in c)  # noqa: E731
    if task == "calendar":  # white page, blue header, 7x5 grid of day cells
        img = Image.new("RGB", SIZE, jitter((250, 250, 250)))
        d = ImageDraw.Draw(img)
        d.rectangle([0, 0, w, 18 + rng.randrange(6)], fill=jitter((30, 80, 200)))
        ox, oy, cw, ch = rng.randrange(4, 14), 28, 20, 17
        for r in range(5):
            for c in range(7):
                d.rectangle([ox + c * cw, oy + r * ch, ox + c * cw + cw - 3, oy + r * ch + ch - 3],
                            outline=(60, 60, 60), fill=jitter((200, 220, 255)) if rng.random() < 0.2 else None)
    elif task == "claim-window":  # dark backdrop, centred green dialog with two buttons
        img = Image.new("RGB", SIZE, jitter((40, 40, 40)))
        d = ImageDraw.Draw(img)
        x0, y0 = rng.randrange(15, 40), rng.randrange(15, 35)
        d.rectangle([x0, y0, w - x0, h - y0], fill=jitter((20, 170, 80)))
        d.rectangle([x0 + 8, h - y0 - 22, x0 + 48, h - y0 - 8], fill=(250, 250, 250))
        d.rectangle([w - x0 - 48, h - y0 - 22, w - x0 - 8, h - y0 - 8], fill=(255, 200, 0))
    elif task == "provider-select":  # beige list of rows with orange avatars
        img = Image.new("RGB", SIZE, jitter((245, 235, 215)))
        d = ImageDraw.Draw(img)
        rows = rng.randrange(4, 7)
        for r in range(rows):
            y = 6 + r * (h // rows)
            d.ellipse([6, y, 22, y + 16], fill=jitter((240, 120, 20)))
            d.rectangle([30, y + 4, 30 + rng.randrange(60, 120), y + 12], fill=(90, 90, 90))
    elif task == "settings":  # purple sidebar, toggle switches (circles)
        img = Image.new("RGB", SIZE, jitter((230, 225, 240)))
        d = ImageDraw.Draw(img)
        d.rectangle([0, 0, 36 + rng.randrange(8), h], fill=jitter((110, 40, 160)))
        for r in range(4):
            y = 12 + r * 26
            d.rounded_rectangle([100, y, 140, y + 16], radius=8, fill=jitter((180, 180, 190)))
            cx = 108 if rng.random() < 0.5 else 132
            d.ellipse([cx - 7, y + 1, cx + 7, y + 15], fill=(255, 255, 255))
    else:  # search: red search bar across the top, grey result cards
        img = Image.new("RGB", SIZE, jitter((255, 255, 255)))
        d = ImageDraw.Draw(img)
        d.rectangle([8, 6, w - 8, 24], outline=jitter((220, 30, 30)), width=3)
        for r in range(rng.randrange(2, 5)):
            d.rectangle([8, 32 + r * 22, w - 8 - rng.randrange(30), 48 + r * 22], fill=jitter((200, 200, 200)))
    # a few random pixels so no two screenshots are identical
    px = img.load()
    for _ in range(8):
        px[rng.randrange(w), rng.randrange(h)] = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    return img


def make_dataset(dir: str | Path, task: str, n: int, seed: int = 0) -> Path:
    """Write ``n`` samples of ``task`` in the seed's JSONL format; return the ``train.jsonl`` path."""
    d = Path(dir)
    (d / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{task}:{seed}")
    lines = []
    for i in range(n):
        sid = f"{task}-{seed}-{i:04d}"
        render(task, rng).save(d / "images" / f"{sid}.png")
        prompt, action = _prompt(task, rng)
        lines.append(json.dumps({
            "id": sid,
            "image": f"images/{sid}.png",
            "conversations": [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": action}],
            "metadata": {"task": task, "index": i},
        }))
    path = d / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# vlrouter's own defaults for the head: views, layer and L2 by cross-validation, the L-BFGS solver
DEFAULTS = {"pooling": "auto", "epochs": None, "batch_size": None, "lr": None, "patience": None, "eval_every": None}


def registry_text(base_model: str | Path, adapters: list[tuple[str, str]], *, pooling: str = "mean",
                  router: dict | None = None, **train) -> str:
    """registry.yaml text: ``adapters`` is ``[(name, dataset_path), ...]``; ``train`` overrides train: keys
    (None drops one), ``router`` adds router: keys. The defaults here are small AdamW settings that keep
    tests fast; ``**DEFAULTS`` asks for vlrouter's own defaults instead."""
    defaults = {"epochs": 60, "batch_size": 16, "lr": 0.01, "patience": 8, "eval_every": 5, "workers": 1,
                "embed_batch_size": 16, "seed": 0}
    defaults.update(train)
    lines = [f"base_model: {base_model}", "router:", "  dir: runs/router", f"  pooling: {pooling}"]
    lines += [f"  {k}: {v}" for k, v in (router or {}).items()]
    lines.append("train:")
    lines += [f"  {k}: {v}" for k, v in defaults.items() if v is not None]
    lines.append("adapters:")
    for name, ds in adapters:
        lines += [f"  - name: {name}", f"    dataset: {ds}", f"    checkpoint: checkpoints/{name}"]
    return "\n".join(lines) + "\n"


def make_registry(tmp: str | Path, tiny_model_dir: str | Path, tasks: list[str] | tuple[str, ...] = TASKS[:3], *,
                  n: int = 30, seed: int = 0, pooling: str = "mean", router: dict | None = None, **train) -> Path:
    """A project folder with one dataset per task and a registry.yaml listing them; returns registry.yaml."""
    root = Path(tmp)
    root.mkdir(parents=True, exist_ok=True)
    adapters = []
    for task in tasks:
        make_dataset(root / "data" / task, task, n, seed)
        adapters.append((task, f"data/{task}/train.jsonl"))
    path = root / "registry.yaml"
    path.write_text(registry_text(tiny_model_dir, adapters, pooling=pooling, router=router, **train))
    return path


def corrupt_file(path: str | Path) -> None:
    """Truncate an image so it no longer decodes (what a half-copied screenshot looks like)."""
    p = Path(path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def blobs(n_per_class=(20, 20, 20), dim=16, seed=0, spread=1.0):
    """Gaussian clusters, one per class: ``(x [N, dim], y [N])``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(len(n_per_class), dim, generator=g) * 3
    xs, ys = [], []
    for c, n in enumerate(n_per_class):
        xs.append(centers[c] + spread * torch.randn(n, dim, generator=g))
        ys += [c] * n
    return torch.cat(xs), torch.tensor(ys)


def retrain(registry, **overrides):
    """``router retrain`` in-process on the local backend: ``registry`` is a Registry or a path to one."""
    from vlrouter.backends.local import retrain_local
    from vlrouter.core.options import resolve_options
    from vlrouter.core.recipe import run_retrain
    from vlrouter.core.registry import Registry

    reg = registry if isinstance(registry, Registry) else Registry.load(registry)
    return run_retrain(reg, resolve_options(reg, overrides), retrain_local)
