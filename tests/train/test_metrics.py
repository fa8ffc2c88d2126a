"""Metric and schedule functions, checked exactly."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from edgeft.train.metrics import Accumulator, classification_metrics, cross_entropy_sum
from edgeft.train.schedule import warmup_linear


def test_classification_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 7, 500), rng.integers(0, 8, 500)
    ours = classification_metrics(y_true, y_pred)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert ours["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert (ours["macro_precision"], ours["macro_recall"], ours["macro_f1"]) == pytest.approx((p, r, f))


def test_cross_entropy_ignores_padding_and_perplexity_is_exp_loss():
    logits = np.log(np.array([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]], dtype=np.float32))
    labels = np.array([[0, 1, -100]])
    total, count = cross_entropy_sum(logits, labels)
    assert count == 2 and total == pytest.approx(-np.log(0.5) - np.log(0.75), rel=1e-6)
    acc = Accumulator("causal-lm")
    acc.add(logits, np.array([[7, 1, 0]]))  # predicts position 1 from 0 and 2 from 1
    result = acc.result()
    assert result["loss"] == pytest.approx((-np.log(0.5) - np.log(0.25)) / 2, rel=1e-6)
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))


def test_warmup_then_linear_decay():
    lrs = [warmup_linear(s, 10, 2, 1.0) for s in range(11)]
    assert lrs[:3] == [0.0, 0.5, 1.0]
    assert lrs[-1] == 0.0 and lrs[6] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert warmup_linear(0, 10, 0, 1.0) == 1.0
