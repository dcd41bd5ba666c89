"""The eval report: what report.html and misrouted.jsonl show for a given evaluation result."""

from __future__ import annotations

import json
import re

from PIL import Image

from vlrouter.core.metrics import classification_metrics
from vlrouter.core.report import write_report

NAMES = ["calendar", "claim-window", "provider-select", "settings", "search"]


def _row(i, true, probs, image, **extra):
    p = dict(zip(NAMES, probs))
    return {"id": f"s{i}", "image": str(image), "prompt": f"Click <b>{i}</b>", "adapter": true,
            "routed": max(p, key=p.get), "probs": p, "ood_score": None, "known": True, **extra}


def _result(tmp_path):
    good = tmp_path / "shot.png"
    Image.new("RGB", (400, 300), (200, 30, 30)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows = [
        _row(0, "calendar", [0.9, 0.04, 0.03, 0.02, 0.01], good),
        _row(1, "calendar", [0.1, 0.15, 0.2, 0.25, 0.3], good),  # misrouted: search
        _row(2, "settings", [0.5, 0.3, 0.1, 0.05, 0.05], broken, known=False, ood_score=3.214),  # -> calendar
    ]
    metrics = classification_metrics([NAMES.index(r["routed"]) for r in rows],
                                     [NAMES.index(r["adapter"]) for r in rows], NAMES)
    metrics.update(ece_calibrated=float("nan"), temperature=1.5)  # no "ece": not measured
    return {"metrics": metrics, "samples": rows, "router_dir": "runs/router", "dataset_dir": "runs/dataset",
            "split": "val", "representation": "mean @ layer 2"}


def test_misrouted_samples_are_written_and_shown_with_their_three_likeliest_adapters(tmp_path):
    out = tmp_path / "reports" / "eval"  # made with its parents
    path = write_report(_result(tmp_path), out)
    assert path == out / "report.html"
    misrouted = [json.loads(line) for line in (out / "misrouted.jsonl").read_text().splitlines()]
    assert [(r["id"], r["routed"]) for r in misrouted] == [("s1", "search"), ("s2", "calendar")]
    html = path.read_text()
    cards = html.split("<div class='card'>")[1:]
    assert len(cards) == 2 and "Misrouted samples (2)" in html and "2 misrouted" in html
    bars = [re.findall(r"<div class='bar'><span>([^<]+)</span><i style='width:([\d.]+)%'></i><b>([\d.]+)</b>", c)
            for c in cards]
    assert bars[0] == [("search", "30.0", "0.30"), ("settings", "25.0", "0.25"), ("provider-select", "20.0", "0.20")]
    assert [b[0] for b in bars[1]] == ["calendar", "claim-window", "provider-select"]


def test_a_report_written_again_into_the_same_folder_replaces_the_last_one(tmp_path):
    out = tmp_path / "report"
    write_report(_result(tmp_path), out)
    result = _result(tmp_path)
    result["samples"] = result["samples"][:1]  # now nothing is misrouted
    html = write_report(result, out).read_text()  # the folder exists: no error
    assert "Misrouted samples (0)" in html and "0 misrouted" in html and "<div class='card'>" not in html
    assert (out / "misrouted.jsonl").read_text() == ""
    assert (out / "confusion.png").is_file() and (out / "reliability.png").is_file()


def test_a_card_shows_the_picture_or_says_it_is_unreadable_and_flags_unknown_inputs(tmp_path):
    html = write_report(_result(tmp_path), tmp_path / "out").read_text()
    first, second = html.split("<div class='card'>")[1:]
    assert "<img src='data:image/jpeg;base64," in first and "unknown" not in first
    assert "image unreadable" in second and "<em>unknown (ood_score 3.21)</em>" in second
    assert "true <b>settings</b> → routed <b class='bad'>calendar</b>" in second
    assert "Click &lt;b&gt;2&lt;/b&gt;" in second  # the prompt is text, never markup


def test_the_summary_shows_every_adapters_numbers_and_dashes_for_what_is_not_a_number(tmp_path):
    html = write_report(_result(tmp_path), tmp_path / "out").read_text()
    assert "(val\nsplit, 3 samples)" in html and "<b>mean @ layer 2</b>" in html
    assert "Accuracy <b>0.333</b>; ECE - before, - after\ntemperature 1.500" in html
    assert "<tr><td>calendar</td><td>0.500</td><td>0.500</td><td>0.500</td><td>2</td></tr>" in html
    assert "<tr><td>search</td><td>0.000</td><td>0.000</td><td>0.000</td><td>0</td></tr>" in html
    assert html.count("data:image/png;base64,") == 2  # confusion + reliability, inlined


def test_a_misrouted_screenshot_is_inlined_as_a_small_thumbnail_keeping_its_shape(tmp_path):
    import base64
    import io

    from vlrouter.core.report import THUMB

    result = _result(tmp_path)
    big = tmp_path / "big.png"
    Image.new("RGB", (1920, 1080), (30, 120, 200)).save(big)  # a full-HD screenshot would bloat report.html
    result["samples"][1]["image"] = str(big)
    html = write_report(result, tmp_path / "out").read_text()
    first = html.split("<div class='card'>")[1]
    data = re.search(r"<img src='data:image/jpeg;base64,([^']+)'", first).group(1)
    thumb = Image.open(io.BytesIO(base64.b64decode(data)))
    assert thumb.width <= THUMB[0] and thumb.height <= THUMB[1]
    assert thumb.size == (THUMB[0], round(THUMB[0] * 1080 / 1920))  # 16:9 kept, not squashed to the box
