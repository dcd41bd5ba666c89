"""Calibration and metrics: temperature, ECE, per-class precision/recall/F1, confusion."""

from __future__ import annotations

import pytest
import torch

from vlrouter.core.metrics import calibrate_temperature, classification_metrics, expected_calibration_error


def test_temperature_fixes_overconfidence_and_ece_drops():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    logits = torch.randn(300, 3, generator=g)
    logits[torch.arange(300), y] += 1.0  # ~60% accurate ...
    logits *= 8  # ... but very confident
    t = calibrate_temperature(logits, y)
    assert t > 2
    before = torch.nn.functional.cross_entropy(logits, y)
    after = torch.nn.functional.cross_entropy(logits / t, y)
    assert after < before
    assert expected_calibration_error(torch.softmax(logits / t, 1), y) < expected_calibration_error(
        torch.softmax(logits, 1), y)


def test_classification_metrics_per_class_and_confusion():
    m = classification_metrics([0, 0, 1, 1, 2, 0], [0, 1, 1, 1, 2, 2], ["a", "b", "c"])
    assert m["confusion"] == [[1, 0, 0], [1, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["a"] == {"precision": pytest.approx(1 / 3, abs=1e-4), "recall": 1.0, "f1": 0.5,
                                   "support": 1}
    assert m["per_class"]["b"]["precision"] == 1.0 and m["per_class"]["b"]["recall"] == pytest.approx(0.6667, 1e-3)
