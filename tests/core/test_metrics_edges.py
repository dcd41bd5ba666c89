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


def test_a_perfectly_separated_val_split_gets_the_lowest_temperature_not_zero():
    # the NLL keeps falling as T -> 0; calibration stops at its lower bound, 0.05, and at 20 above
    logits = torch.tensor([[1.0, -1.0], [-1.0, 1.0]] * 5)
    assert 0.05 <= calibrate_temperature(logits, [0, 1] * 5) <= 0.055
    flat = torch.tensor([[0.1, -0.1], [0.1, -0.1]] * 5)  # coin flips that look a little sure: T grows, to the cap
    assert 19.0 <= calibrate_temperature(flat, [0, 1] * 5) <= 20.0
