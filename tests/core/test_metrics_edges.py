"""Calibration error at bin edges, and the confusion plot: written where asked, no figure left open."""

from __future__ import annotations

import pytest
import torch

from vlrouter.core.metrics import (
    calibrate_temperature,
    classification_metrics,
    expected_calibration_error,
    plot_confusion,
)


def test_ece_counts_a_confidence_on_a_bin_edge_once():
    # bins=2: [0, 0.5] and (0.5, 1]. Confidence 0.5 belongs to the first bin only, 1.0 to the last.
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.9, 0.1], [1.0, 0.0]], dtype=torch.float64)
    labels = [0, 0, 0, 1]  # the confident last one is wrong
    # first bin: accuracy 1, confidence 0.5, weight 1/4; second: accuracy 2/3, confidence 2.8/3, weight 3/4
    expected = (1 / 4) * 0.5 + (3 / 4) * (2.8 / 3 - 2 / 3)
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(expected, abs=1e-12)


def test_ece_first_bin_starts_at_zero():
    # three classes: a confidence of 0.4 lies in the first bin [0, 0.5]
    probs = torch.tensor([[0.4, 0.3, 0.3], [0.8, 0.1, 0.1]], dtype=torch.float64)
    assert expected_calibration_error(probs, [0, 0], bins=2) == pytest.approx(0.5 * 0.6 + 0.5 * 0.2, abs=1e-12)


def test_ece_of_a_calibrated_and_of_an_overconfident_router():
    probs = torch.tensor([[0.75, 0.25]] * 4, dtype=torch.float64)
    assert expected_calibration_error(probs, [0, 0, 0, 1]) == pytest.approx(0.0, abs=1e-12)  # 75% right at 0.75
    assert expected_calibration_error(probs, [0, 1, 1, 1]) == pytest.approx(0.5, abs=1e-12)  # 25% right at 0.75


def test_confusion_plot_is_written_into_a_new_folder_and_closes_its_figure(tmp_path):
    import matplotlib.pyplot as plt

    m = classification_metrics([0, 1, 1], [0, 1, 0], ["calendar", "claim-window"])
    before = set(plt.get_fignums())
    out = plot_confusion(m, tmp_path / "new" / "folder" / "confusion.png")
    assert out == tmp_path / "new" / "folder" / "confusion.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(plt.get_fignums()) == before  # a long-running eval loop must not pile up figures
    again = plot_confusion(m, out)  # the folder exists now: overwritten, no error
    assert again == out and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_temperature_is_the_nll_minimum_to_a_fraction_of_a_percent():
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 4, (400,), generator=g)
    logits = torch.randn(400, 4, generator=g, dtype=torch.float64)
    logits[torch.arange(400), y] += 1.5
    logits *= 3.7

    def nll(t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / t, y))

    t = calibrate_temperature(logits, y)
    # a dense scan around the answer finds nothing better by more than rounding
    scan = [t * (1 + k / 2000) for k in range(-200, 201)]
    assert nll(t) <= min(nll(s) for s in scan) + 1e-9
    assert min(scan, key=nll) == pytest.approx(t, rel=2e-3)


def test_evaluate_without_a_temperature_reports_the_raw_calibration():
    from vlrouter.core.head import HeadShape, build_head
    from vlrouter.core.metrics import evaluate

    torch.manual_seed(0)
    head = build_head(HeadShape(in_dim=4, num_labels=3))
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    m = evaluate(head, x, y, class_names=["a", "b", "c"])
    assert m["temperature"] == 1.0
    assert m["nll_calibrated"] == pytest.approx(m["nll"]) and m["ece_calibrated"] == pytest.approx(m["ece"])
    hot = evaluate(head, x, y, class_names=["a", "b", "c"], temperature=3.0)
    assert hot["nll"] == pytest.approx(m["nll"]) and hot["nll_calibrated"] != pytest.approx(m["nll"])
    z = head(x).detach().double() / 3.0  # calibrated: the logits divided by the temperature
    assert hot["nll_calibrated"] == pytest.approx(float(torch.nn.functional.cross_entropy(z, y)), rel=1e-6)
    assert hot["ece_calibrated"] == pytest.approx(expected_calibration_error(torch.softmax(z, 1), y), abs=1e-9)


def test_a_perfectly_separated_val_split_gets_the_lowest_temperature_not_zero():
    # the NLL keeps falling as T -> 0; calibration stops at its lower bound, 0.05, and at 20 above
    logits = torch.tensor([[1.0, -1.0], [-1.0, 1.0]] * 5)
    assert 0.05 <= calibrate_temperature(logits, [0, 1] * 5) <= 0.055
    flat = torch.tensor([[0.1, -0.1], [0.1, -0.1]] * 5)  # coin flips that look a little sure: T grows, to the cap
    assert 19.0 <= calibrate_temperature(flat, [0, 1] * 5) <= 20.0


def test_an_nll_minimum_just_above_the_lowest_temperature_is_found_not_snapped_to_the_bound():
    # two classes, margin m, 90% right: the NLL is smallest where softmax gives 0.9, T = m / ln 9.
    # Put that optimum at 0.0505, inside the first grid cell above the bound 0.05.
    import math

    want = 0.0505
    m = want * math.log(9)
    logits = torch.tensor([[m / 2, -m / 2]] * 10, dtype=torch.float64)
    labels = [0] * 9 + [1]
    assert calibrate_temperature(logits, labels) == pytest.approx(want, rel=1e-3)


def test_reliability_bins_cover_equal_width_confidence_intervals():
    from vlrouter.core.metrics import reliability_bins

    probs = torch.tensor([[0.55, 0.45], [0.7, 0.3], [0.3, 0.7], [0.95, 0.05], [1.0, 0.0]], dtype=torch.float64)
    labels = [0, 0, 0, 0, 1]  # the 0.7 of row 3 is wrong (predicts 1), so is the sure last one
    bins = reliability_bins(probs, labels, bins=4)
    assert [(b["lo"], b["hi"]) for b in bins] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert [b["n"] for b in bins] == [0, 0, 3, 2]
    assert bins[2]["confidence"] == pytest.approx((0.55 + 0.7 + 0.7) / 3)
    assert bins[2]["accuracy"] == pytest.approx(2 / 3)
    assert bins[3]["confidence"] == pytest.approx(0.975) and bins[3]["accuracy"] == pytest.approx(0.5)
    assert all(b["confidence"] != b["confidence"] for b in bins[:2])  # empty bins: nan, not 0


def test_reliability_diagram_draws_the_perfect_calibration_diagonal_corner_to_corner(tmp_path):
    import numpy as np
    from PIL import Image

    from vlrouter.core.metrics import plot_reliability, reliability_bins

    bins = reliability_bins(torch.tensor([[0.85, 0.15]] * 3, dtype=torch.float64), [0, 0, 1], bins=10)
    out = plot_reliability(bins, tmp_path / "new" / "folder" / "reliability.png")  # folders made as needed
    px = np.asarray(Image.open(out).convert("RGB")).astype(int)
    dark = px.sum(2) < 150  # the black axes frame: its rows and columns run across most of the picture
    rows = np.where(dark.sum(1) > 0.5 * px.shape[1])[0]
    cols = np.where(dark.sum(0) > 0.5 * px.shape[0])[0]
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    assert right - left > 200 and bottom - top > 200

    def grey_near(t: float) -> bool:  # the dashed grey line through (t, t) in axes (= data, limits 0..1) coordinates
        x, y = round(left + t * (right - left)), round(bottom - t * (bottom - top))
        patch = px[y - 1:y + 2, x - 1:x + 2]
        spread = patch.max(2) - patch.min(2)
        return bool(((patch.max(2) < 225) & (spread < 12)).any())

    # away from the centre (where a diagonal over padded limits would cross it) and from the bars/legend
    ts = [0.08 + i * 0.01 for i in range(28)] + [0.62 + i * 0.01 for i in range(12)]
    hits = sum(grey_near(t) for t in ts)
    assert hits > 0.6 * len(ts), hits


@pytest.fixture
def gui_default_backend(tmp_path, monkeypatch):
    """A user's matplotlibrc (or MPLBACKEND) may name a GUI backend; on a headless server it cannot make a figure."""
    import matplotlib
    import matplotlib.pyplot as plt

    (tmp_path / "vlrouter_test_gui_backend.py").write_text(
        "from matplotlib.backend_bases import FigureCanvasBase, FigureManagerBase\n"
        "class FigureCanvas(FigureCanvasBase):\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        raise RuntimeError('cannot open a window: no display')\n"
        "FigureManager = FigureManagerBase\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    old = matplotlib.get_backend()
    plt.switch_backend("module://vlrouter_test_gui_backend")
    yield
    plt.switch_backend(old)


def test_reliability_diagram_is_written_when_the_default_backend_cannot_open_a_window(tmp_path, gui_default_backend):
    from vlrouter.core.metrics import plot_reliability, reliability_bins

    bins = reliability_bins(torch.tensor([[0.9, 0.1], [0.6, 0.4]], dtype=torch.float64), [0, 1], bins=5)
    out = plot_reliability(bins, tmp_path / "reliability.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_confusion_plot_is_written_when_the_default_backend_cannot_open_a_window(tmp_path, gui_default_backend):
    m = classification_metrics([0, 1, 1], [0, 1, 0], ["calendar", "claim-window"])
    out = plot_confusion(m, tmp_path / "confusion.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reliability_diagram_bars_span_their_bins_with_markers_at_mean_confidence(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from vlrouter.core.metrics import plot_reliability, reliability_bins

    saved = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: saved.append(fig) or real_savefig(fig, *a, **kw))
    probs = torch.tensor([[0.55, 0.45], [0.65, 0.35], [0.92, 0.08], [0.98, 0.02]], dtype=torch.float64)
    bins = reliability_bins(probs, [0, 1, 0, 0], bins=5)  # filled: (0.4, 0.6], (0.6, 0.8], (0.8, 1]
    plot_reliability(bins, tmp_path / "reliability.png")
    ax = saved[0].axes[0]
    bars = [v for p in ax.patches for v in (p.get_x(), p.get_width(), p.get_height())]
    assert bars == pytest.approx([0.4, 0.2, 1.0, 0.6, 0.2, 0.0, 0.8, 0.2, 1.0])  # (x, width, accuracy) per filled bin
    markers = next(line for line in ax.get_lines() if line.get_marker() == "o")
    assert list(markers.get_xdata()) == pytest.approx([0.55, 0.65, 0.95])  # at each bin's mean confidence
    assert list(markers.get_ydata()) == pytest.approx([1.0, 0.0, 1.0])


def test_temperature_stops_exactly_at_the_upper_bound_when_the_nll_keeps_falling():
    from vlrouter.core.metrics import TEMPERATURE_RANGE

    wrong = torch.tensor([[2.0, -2.0]] * 6, dtype=torch.float64)  # confidently wrong every time: T -> infinity
    assert calibrate_temperature(wrong, [1] * 6) == TEMPERATURE_RANGE[1] == 20.0


def test_a_class_never_predicted_or_never_present_scores_zero_not_a_division_error():
    m = classification_metrics([0, 0, 0], [0, 2, 0], ["a", "b", "c"])  # predictions, labels
    b, c = m["per_class"]["b"], m["per_class"]["c"]
    assert b == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}  # never predicted, never present
    assert c == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # present once, never predicted
    assert m["per_class"]["a"] == {"precision": pytest.approx(2 / 3, abs=1e-4), "recall": 1.0,
                                   "f1": pytest.approx(0.8), "support": 2}


def test_logits_that_say_nothing_leave_the_temperature_near_one_not_at_a_bound():
    # every T gives the same NLL (log 3): the tie goes to the temperature closest to 1
    assert calibrate_temperature(torch.zeros(6, 3), [0, 1, 2, 0, 1, 2]) == pytest.approx(1.0, rel=0.05)


def test_ece_uses_15_equal_width_bins_unless_told_otherwise():
    from vlrouter.core.metrics import ECE_BINS

    # 0.61 (right) and 0.65 (wrong) share the 15-bin cell (0.6, 0.667] but not a 16-bin one
    probs = torch.tensor([[0.61, 0.39], [0.65, 0.35]], dtype=torch.float64)
    labels = [0, 1]
    assert ECE_BINS == 15
    assert expected_calibration_error(probs, labels) == pytest.approx(abs(0.5 - 0.63), abs=1e-12)
    assert expected_calibration_error(probs, labels, bins=16) == pytest.approx(0.5 * 0.39 + 0.5 * 0.65, abs=1e-12)


def test_reliability_bins_default_to_tenths_and_a_confidence_on_the_first_edge_is_counted():
    from vlrouter.core.metrics import reliability_bins

    uniform = torch.full((3, 4), 0.25, dtype=torch.float64)  # four classes, no idea: confidence 1/4
    bins = reliability_bins(uniform, [0, 1, 2])
    assert [(b["lo"], b["hi"]) for b in bins] == [(i / 10, (i + 1) / 10) for i in range(10)]
    assert [b["n"] for b in bins] == [0, 0, 3] + [0] * 7
    edge = reliability_bins(uniform, [0, 1, 2], bins=4)  # 0.25 is the first bin's upper edge: it belongs there
    assert [b["n"] for b in edge] == [3, 0, 0, 0] and edge[0]["accuracy"] == pytest.approx(1 / 3)


def test_metrics_of_no_samples_are_zero_not_a_division_error():
    m = classification_metrics([], [], ["a", "b"])
    assert (m["n"], m["accuracy"], m["confusion"]) == (0, 0.0, [[0, 0], [0, 0]])
    assert m["per_class"]["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
