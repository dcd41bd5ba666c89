#!/usr/bin/env python
"""Routing quality on the demo's four tasks: the seed's head vs vlrouter's default, per view and layer, OOD, early exit.

    python bench/bench_quality.py --json bench/results/quality.json

On the demo's synthetic screenshots (a fifth of the instructions are shared across tasks,
so only the image tells them apart) with the ``demo`` random Qwen3-VL, one run measures:

* the seed's head (mean of the last layer, AdamW at lr 1e-4 for 100 epochs, patience 5)
  against vlrouter's default (views and layer chosen by CV, L-BFGS head, L2 by CV) and an
  independently L2-tuned logistic regression (scikit-learn, ``LogisticRegressionCV``) on
  the default's features: validation and held-out accuracy, accuracy on the shared
  instructions, ECE after temperature on the held-out screenshots;
* held-out accuracy of every view × layer candidate (each fitted on train with the chosen
  L2) next to its cross-validated accuracy;
* OOD: trained on three tasks, the AUROC of ``ood_score`` for the fourth task's
  screenshots, blank screenshots and random noise against held-out in-distribution ones;
* route latency with the router at the chosen (early) layer vs the last layer, on the
  ``100m`` preset, side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing the tests package


def _demo_project(root: Path, n: int, heldout: int, tasks) -> tuple[Path, list[dict]]:
    from vlrouter.core.tiny import build_tiny_model
    from vlrouter.demo.screens import write_dataset, write_heldout

    if not (root / "model" / "config.json").exists():
        build_tiny_model(root / "model", "demo")
    for t in tasks:
        if not (root / "data" / t / "train.jsonl").exists():
            write_dataset(t, root / "data" / t, n, seed=0)
    return root / "model", write_heldout(root / "heldout", heldout, seed=1000)


def _registry(root: Path, model: Path, tasks, name: str, **train) -> Path:
    lines = [f"base_model: {model}", "router:", f"  dir: runs/{name}"]
    router_keys = {k: train.pop(k) for k in ("pooling", "layer", "ood") if k in train}
    lines += [f"  {k}: {v}" for k, v in router_keys.items()]
    lines += ["train:", "  workers: 1", "  embed_batch_size: 16", "  cache_dir: .features", "  datasets_dir: datasets"]
    lines += [f"  {k}: {v}" for k, v in train.items()]
    lines.append("adapters:")
    for t in tasks:
        lines += [f"  - name: {t}", f"    dataset: data/{t}/train.jsonl", f"    checkpoint: checkpoints/{t}"]
    path = root / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _retrain(path: Path):
    from vlrouter.backends.local import retrain_local
    from vlrouter.core.options import resolve_options
    from vlrouter.core.recipe import run_retrain
    from vlrouter.core.registry import Registry

    reg = Registry.load(path)
    t0 = time.perf_counter()
    result = run_retrain(reg, resolve_options(reg), retrain_local, force=True)
    return reg, result, time.perf_counter() - t0


def _heldout_views(encoder, rows, cache_root: Path, layers):
    from vlrouter.core.data import Sample
    from vlrouter.core.features import FeatureCache, embed_dataset

    samples = [Sample(id=Path(r["image"]).stem, image=r["image"], prompt=r["prompt"], target=r["action"],
                      adapter=r["task"], source=r["image"]) for r in rows]
    views, _ = embed_dataset(encoder, samples, FeatureCache(cache_root, encoder.fingerprint()), layers=layers,
                             batch_size=16)
    return views


def _score(router, views, rows, names):
    import torch

    from vlrouter.core.head import head_logits
    from vlrouter.core.metrics import expected_calibration_error
    from vlrouter.demo.screens import GENERIC_INSTRUCTIONS

    keep = [i for i, r in enumerate(rows) if r["task"] in names]
    rep = router.meta.representation()
    x = rep.features(views)[keep]
    y = torch.tensor([names.index(rows[i]["task"]) for i in keep])
    probs = torch.softmax(head_logits(router.head, x).double() / router.meta.temperature, -1)
    right = probs.argmax(1) == y
    shared = torch.tensor([rows[i]["prompt"] in GENERIC_INSTRUCTIONS for i in keep])
    return {"heldout_acc": float(right.double().mean()), "heldout_n": len(keep),
            "shared_acc": float(right[shared].double().mean()) if shared.any() else None,
            "shared_n": int(shared.sum()), "heldout_ece": expected_calibration_error(probs, y)}


def quality(workdir: Path, n: int, heldout: int) -> dict:
    import torch

    from vlrouter.core.encoder import Encoder
    from vlrouter.core.fit import fit_logistic
    from vlrouter.core.head import standardize_stats
    from vlrouter.core.recipe import SplitFeatures  # noqa: F401  (documents what fit_candidate reads)
    from vlrouter.core.store import read_router
    from vlrouter.core.views import Representation, default_layers
    from vlrouter.demo.screens import TASKS

    tasks = list(TASKS)
    model, rows = _demo_project(workdir, n, heldout, tasks)
    encoder = Encoder.load(str(model), device="cpu")
    layers = default_layers(encoder.num_layers)
    out: dict = {"samples_per_task": n, "heldout_per_task": heldout, "tasks": tasks, "layers": layers}

    runs = {
        "seed": dict(pooling="mean", layer=-1, solver="adamw", lr=1.0e-4, epochs=100, batch_size=8, patience=5,
                     eval_every=20),
        "default": {},
    }
    hviews = _heldout_views(encoder, rows, workdir / ".features", layers)
    routers = {}
    for name, train in runs.items():
        reg, result, secs = _retrain(_registry(workdir, model, tasks, name, **train))
        router = read_router(reg.router_dir)
        routers[name] = router
        meta = router.meta
        out[name] = {"val_acc": meta.metrics["val_acc"], "n_val": meta.metrics["n_val"], "seconds": round(secs, 1),
                     "representation": meta.representation().label, "solver": meta.solver, "l2": meta.l2,
                     "temperature": meta.temperature, "val_ece": meta.metrics.get("ece_calibrated"),
                     **_score(router, hviews, rows, tasks)}

    # the same features, an independent L2-tuned logistic regression (scikit-learn)
    from sklearn.linear_model import LogisticRegressionCV

    from vlrouter.core.data import load_routing_dataset
    from vlrouter.core.features import FeatureCache, embed_dataset

    default = routers["default"]
    ds = load_routing_dataset(default.meta.metrics["dataset_dir"])
    rep = default.meta.representation()
    split_views = {}
    for split in ("train", "val"):
        v, _ = embed_dataset(encoder, ds.split(split), FeatureCache(workdir / ".features", encoder.fingerprint()),
                             layers=layers, batch_size=16)
        split_views[split] = v
    tx, vx = rep.features(split_views["train"]), rep.features(split_views["val"])
    ty = [s.label for s in ds.split("train")]
    vy = torch.tensor([s.label for s in ds.split("val")])
    mean, std = standardize_stats(tx)
    clf = LogisticRegressionCV(Cs=20, cv=5, max_iter=5000).fit(((tx - mean) / std).numpy(), ty)
    sk_val = float((torch.tensor(clf.predict(((vx - mean) / std).numpy())) == vy).double().mean())
    hx = rep.features(hviews)
    hy = [tasks.index(r["task"]) for r in rows]
    sk_held = float((torch.tensor(clf.predict(((hx - mean) / std).numpy())) == torch.tensor(hy)).double().mean())
    out["sklearn"] = {"val_acc": sk_val, "heldout_acc": sk_held, "C": float(clf.C_[0])}

    # every candidate: CV accuracy (from router.json) and held-out accuracy with the chosen L2
    table = []
    for cand in default.meta.selection.get("candidates", []):
        r = Representation(tuple(cand["views"]), cand["layer"])
        cx = r.features(split_views["train"])
        m, s = standardize_stats(cx)
        w, b, _ = fit_logistic((cx - m) / s, ty, num_labels=len(tasks), l2=default.meta.l2)
        pred = (((r.features(hviews) - m) / s) @ w.T + b).argmax(1)
        table.append({**cand, "heldout_acc": float((pred == torch.tensor(hy)).double().mean())})
    out["candidates"] = table
    return out


def _odd_rows(workdir: Path, rows: list[dict], n: int) -> list[dict]:
    """Blank screenshots (one grey each) and random noise, at the demo's sizes, with in-distribution prompts."""
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    odd = workdir / "odd"
    odd.mkdir(exist_ok=True)
    extra = []
    for i in range(n):
        w, h = 320 + 8 * i, 240 + 5 * i
        shade = int(torch.randint(0, 256, (1,), generator=g))
        Image.new("RGB", (w, h), (shade, shade, shade)).save(odd / f"blank-{i}.png")
        noise = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(noise).save(odd / f"noise-{i}.png")
        prompt = rows[i]["prompt"]
        extra += [{"image": str(odd / f"blank-{i}.png"), "prompt": prompt, "task": "blank", "action": ""},
                  {"image": str(odd / f"noise-{i}.png"), "prompt": prompt, "task": "noise", "action": ""}]
    return extra


def ood(workdir: Path, n: int, heldout: int) -> dict:
    """Leave one task out: train on the other three; AUROC of ood_score for it, blanks and noise."""
    from vlrouter.core.encoder import Encoder
    from vlrouter.core.ood import auroc
    from vlrouter.core.store import read_router
    from vlrouter.core.views import view_key
    from vlrouter.demo.screens import TASKS

    model, rows = _demo_project(workdir, n, heldout, TASKS)
    encoder = Encoder.load(str(model), device="cpu")
    allrows = rows + _odd_rows(workdir, rows, heldout)
    out: dict = {}
    for unseen in TASKS:
        tasks = [t for t in TASKS if t != unseen]
        reg, _, _ = _retrain(_registry(workdir, model, tasks, f"without-{unseen}"))
        router = read_router(reg.router_dir)
        rep = router.meta.representation()
        views = _heldout_views(encoder, allrows, workdir / ".features", [rep.layer])
        content, layout = views[view_key("image-std", rep.layer)], views[view_key("layout", rep.layer)]
        scores = router.ood.score(router.head[0](rep.features(views)), content, layout).tolist()
        by: dict[str, list[float]] = {}
        for r, s in zip(allrows, scores):
            by.setdefault("in" if r["task"] in tasks else r["task"], []).append(s)
        row = {"representation": rep.label, "threshold": router.ood.threshold,
               "known_rate_in": sum(s <= router.ood.threshold for s in by["in"]) / len(by["in"])}
        for kind in (unseen, "blank", "noise"):
            flagged = sum(s > router.ood.threshold for s in by[kind]) / len(by[kind])
            row[kind if kind != unseen else "unseen task"] = {"auroc": auroc(by["in"], by[kind]), "flagged": flagged}
        out[unseen] = row
    return out


def latency(workdir: Path, reps: int) -> dict:
    """Route latency on the 100m preset: a router at an early layer vs the last, same engine build."""
    import statistics

    import torch

    from tests import engine_helpers as H
    from vlrouter.core.engine import Engine
    from vlrouter.core.tiny import build_tiny_model
    from vlrouter.core.views import default_layers

    model = workdir / "model-100m"
    if not (model / "config.json").exists():
        build_tiny_model(model, "100m")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = {}
    n_layers = None
    for where in ("early", "last"):
        proj = workdir / f"lat-{where}"
        if n_layers is None:
            import json as _json

            n_layers = _json.loads((model / "config.json").read_text())["text_config"]["num_hidden_layers"]
        layer = default_layers(n_layers)[0] if where == "early" else -1
        reg = H.make_project(proj, model, layer=layer) if not (proj / "registry.yaml").exists() else \
            proj / "registry.yaml"
        engine = Engine.from_registry(reg, device="cpu")
        img, prompt, _ = H.samples()[0]
        engine.route(img, prompt)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            engine.route(img, prompt)
            times.append((time.perf_counter() - t0) * 1e3)
        out[where] = {"layer": engine.representation.layer, "of": n_layers, "route_ms": statistics.median(times)}
        del engine
    out["speedup"] = out["last"]["route_ms"] / out["early"]["route_ms"]
    return out


def render(r: dict) -> str:
    s, d, sk = r["quality"]["seed"], r["quality"]["default"], r["quality"]["sklearn"]
    q = r["quality"]

    def pct(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [
        f"Demo data: {len(q['tasks'])} tasks × {q['samples_per_task']} screenshots (train + val), "
        f"{q['heldout_per_task']} held-out per task; `demo` random Qwen3-VL.",
        "",
        "| head | representation | val acc | held-out acc | shared instructions | held-out ECE (after T) |",
        "|---|---|---:|---:|---:|---:|",
        f"| seed: mean of last layer, AdamW lr 1e-4 | {s['representation']} | {pct(s['val_acc'])} | "
        f"{pct(s['heldout_acc'])} | {pct(s['shared_acc'])} | {pct(s['heldout_ece'])} |",
        f"| vlrouter default (CV views/layer, L-BFGS, l2 {d['l2']:g}) | {d['representation']} | {pct(d['val_acc'])} | "
        f"{pct(d['heldout_acc'])} | {pct(d['shared_acc'])} | {pct(d['heldout_ece'])} |",
        f"| scikit-learn LogisticRegressionCV, same features | {d['representation']} | {pct(sk['val_acc'])} | "
        f"{pct(sk['heldout_acc'])} | - | - |",
        "",
        "Every candidate the default scored (5-fold CV on the training split; held-out: fitted on train):",
        "",
        "| views | layer | CV acc | held-out acc |",
        "|---|---:|---:|---:|",
    ]
    for c in sorted(q["candidates"], key=lambda c: (-c["cv_acc"], c["cv_nll"])):
        lines.append(f"| {'+'.join(c['views'])} | {c['layer']} | {c['cv_acc']:.3f} | {c['heldout_acc']:.3f} |")
    lines += [
        "",
        "OOD, leaving one task out (trained on the other three; AUROC of `ood_score` against the held-out "
        "screenshots of the three; flagged = share above the threshold):",
        "",
        "| left out | in-distribution known | unseen task AUROC (flagged) | blank AUROC (flagged) "
        "| noise AUROC (flagged) |",
        "|---|---:|---:|---:|---:|",
    ]
    for task, o in r["ood"].items():
        cells = [f"{o[k]['auroc']:.3f} ({o[k]['flagged']:.0%})" for k in ("unseen task", "blank", "noise")]
        lines.append(f"| {task} | {o['known_rate_in']:.0%} | " + " | ".join(cells) + " |")
    la = r["latency"]
    lines += [
        "",
        f"Route latency, `100m` preset ({la['early']['of']} layers), router at layer {la['early']['layer']} vs "
        f"{la['last']['layer']}: {la['early']['route_ms']:.0f} ms vs {la['last']['route_ms']:.0f} ms "
        f"(**{la['speedup']:.2f}×** faster with early exit; median of {r['latency_reps']} routes, same process).",
        "",
        f"{r['machine']}",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--workdir", type=Path, help="keep the demo data, models and caches here (default: a temp dir)")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--heldout", type=int, default=100, help="held-out screenshots per task (the demo's own 100)")
    ap.add_argument("--latency-reps", type=int, default=7)
    args = ap.parse_args()
    from vlrouter.cli.ui import quiet_libraries

    quiet_libraries()
    import torch

    work = args.workdir or Path(tempfile.mkdtemp(prefix="vlrouter-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {
        "quality": quality(work, args.samples, args.heldout),
        "ood": ood(work, args.samples, args.heldout),
        "latency": latency(work, args.latency_reps),
        "latency_reps": args.latency_reps,
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, Python "
                   f"{platform.python_version()}",
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
