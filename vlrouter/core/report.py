"""The eval report: one self-contained report.html (confusion, per-class P/R/F1, reliability, misrouted
screenshots) and misrouted.jsonl, from :func:`vlrouter.core.recipe.evaluate_router`'s result."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from vlrouter.core.atomic import atomic_write_bytes
from vlrouter.core.errors import ImageError
from vlrouter.core.images import open_image
from vlrouter.core.metrics import plot_confusion, plot_reliability, reliability_bins

THUMB = (240, 180)
TOP = 3  # probabilities shown per misrouted sample


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _thumbnail(image: str) -> str | None:
    try:
        img = open_image(image).convert("RGB")
    except ImageError:
        return None
    img.thumbnail(THUMB)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _num(x: Any, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_report(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``report.html`` (+ ``confusion.png``, ``reliability.png``, ``misrouted.jsonl``) into ``out_dir``.

    Every image is inlined, so the HTML file alone can be mailed or attached to an issue.
    Returns the HTML path.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m, rows = result["metrics"], result["samples"]
    names = list(m["class_names"])
    confusion = plot_confusion(m, out / "confusion.png", title=f"{Path(result['dataset_dir']).name} / "
                                                             f"{result['split']}")
    probs = torch.tensor([[r["probs"][n] for n in names] for r in rows], dtype=torch.float64).reshape(-1, len(names))
    truth = [names.index(r["adapter"]) for r in rows]
    reliability = plot_reliability(reliability_bins(probs, truth), out / "reliability.png",
                                   title=f"ECE {_num(m.get('ece_calibrated'))} after temperature")
    misrouted = [r for r in rows if r["routed"] != r["adapter"]]
    atomic_write_bytes(out / "misrouted.jsonl", "".join(json.dumps(r) + "\n" for r in misrouted).encode())

    esc = html.escape
    per_class = "".join(
        f"<tr><td>{esc(n)}</td><td>{_num(m['per_class'][n]['precision'])}</td>"
        f"<td>{_num(m['per_class'][n]['recall'])}</td><td>{_num(m['per_class'][n]['f1'])}</td>"
        f"<td>{m['per_class'][n]['support']}</td></tr>" for n in names)
    cards = []
    for r in misrouted:
        top = sorted(r["probs"].items(), key=lambda kv: -kv[1])[:TOP]
        bars = "".join(
            f"<div class='bar'><span>{esc(n)}</span><i style='width:{p * 100:.1f}%'></i><b>{p:.2f}</b></div>"
            for n, p in top)
        thumb = _thumbnail(r["image"])
        img = f"<img src='{thumb}' alt='{esc(r['id'])}'>" if thumb else "<div class='missing'>image unreadable</div>"
        known = "" if r.get("known", True) else f" <em>unknown (ood_score {_num(r.get('ood_score'), 2)})</em>"
        cards.append(f"<div class='card'>{img}<p class='prompt'>{esc(r['prompt'])}</p>"
                     f"<p>true <b>{esc(r['adapter'])}</b> → routed <b class='bad'>{esc(r['routed'])}</b>{known}</p>"
                     f"{bars}<p class='id'>{esc(r['id'])}</p></div>")
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vlrouter eval report</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.figs img{{max-width:48%;margin-right:1%}}
.cards{{display:flex;flex-wrap:wrap;gap:12px}}.card{{border:1px solid #ddd;border-radius:6px;padding:8px;width:250px}}
.card img{{max-width:240px;display:block}}.prompt{{font-style:italic}}.bad{{color:#b00}}.id{{color:#888;font-size:11px}}
.bar{{display:flex;align-items:center;gap:4px;font-size:12px}}.bar span{{width:95px;overflow:hidden}}
.bar i{{display:block;height:8px;background:#4a7bd0}}.bar b{{font-weight:normal;margin-left:auto}}
</style></head><body>
<h1>Router evaluation</h1>
<p>Router <code>{esc(result['router_dir'])}</code> on <code>{esc(result['dataset_dir'])}</code> ({esc(result['split'])}
split, {m['n']} samples). Representation: <b>{esc(str(result.get('representation', '')))}</b>.</p>
<p>Accuracy <b>{_num(m['accuracy'])}</b>; ECE {_num(m.get('ece'))} before, {_num(m.get('ece_calibrated'))} after
temperature {_num(m.get('temperature'), 3)}; {len(misrouted)} misrouted.</p>
<h2>Per adapter</h2>
<table><tr><th>adapter</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{per_class}</table>
<h2>Confusion and reliability</h2>
<div class="figs"><img src="{_data_url(confusion)}" alt="confusion matrix">
<img src="{_data_url(reliability)}" alt="reliability diagram"></div>
<h2>Misrouted samples ({len(misrouted)})</h2>
<div class="cards">{''.join(cards) or '<p>none</p>'}</div>
</body></html>
"""
    path = out / "report.html"
    atomic_write_bytes(path, doc.encode("utf-8"))
    return path
