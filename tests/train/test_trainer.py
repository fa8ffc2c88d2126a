"""Local training: learns on real data, follows the schedule, accumulates, stops early, reports metrics."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.config import TrainConfig
from edgeft.data import DataConfig, load_dataset, split
from edgeft.errors import ConfigError
from edgeft.train.trainer import evaluate, plan_steps, train
from edgeft.train.session import TrainingSession


@pytest.fixture(scope="module")
def banking(tiny_bundle, small_banking):
    train_data = load_dataset(DataConfig(small_banking["train"], label_column="category"), tiny_bundle)
    test_data = load_dataset(DataConfig(small_banking["test"], label_column="category"), tiny_bundle)
    return train_data, test_data


def test_training_improves_the_model_on_real_data(tiny_bundle, banking_csv):
    """Five BANKING77 intents (737 real queries): the tiny model learns to tell them apart. The real
    model's test accuracy on all 77 intents is checked by the slow MiniLM test."""
    full = load_dataset(DataConfig(banking_csv["train"], label_column="category"), tiny_bundle)
    five = full.subset(np.where(full.targets < 5)[0])
    train_data, val_data = split(five, 0.2, seed=0)
    before = evaluate(TrainingSession(tiny_bundle), train_data, "classification", 0)
    result = train(tiny_bundle, train_data, TrainConfig(epochs=4, learning_rate=3e-2, progress=False), val_data)
    assert len(result.history) == 4 and result.steps == 4 * 19
    session = TrainingSession(tiny_bundle)
    session.set_parameters(result.parameters)
    after = evaluate(session, train_data, "classification", 0)
    assert after["loss"] < before["loss"] - 2 and after["accuracy"] > 0.4
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["val_accuracy"] > 0.3
    for key in ("val_accuracy", "val_macro_precision", "val_macro_recall", "val_macro_f1"):
        assert 0 <= result.history[-1][key] <= 1


def test_max_steps_overrides_epochs_and_accumulation_counts_optimizer_steps(tiny_bundle, banking):
    train_data, _ = banking
    config = TrainConfig(epochs=5, max_steps=7, grad_accum_steps=2, progress=False)
    assert plan_steps(len(train_data), config) == (8, 7)
    result = train(tiny_bundle, train_data, config)
    assert result.steps == 7 and len(result.history) == 1


def test_gradient_accumulation_matches_the_big_batch(tiny_bundle, banking):
    """Two accumulated half-batches give the same AdamW step as one full batch.

    ORT sums the halves' gradients (twice the mean); AdamW's step is invariant to that scale except
    through eps, which moves parameters whose gradient is near eps by a fraction of the learning rate."""
    from edgeft.data import collate

    train_data, _ = banking
    index = np.arange(32)
    full = collate(train_data, index, 0)
    halves = [collate(train_data, index[:16], 0), collate(train_data, index[16:], 0)]
    # equal widths so the halves' mean losses average to the full batch's
    width = full["input_ids"].shape[1]
    for half in halves:
        pad = width - half["input_ids"].shape[1]
        for key in ("input_ids", "attention_mask"):
            half[key] = np.pad(half[key], ((0, 0), (0, pad)))
    a, b = TrainingSession(tiny_bundle), TrainingSession(tiny_bundle)
    a.train_step(full)
    a.optimizer_step(1e-3)
    for half in halves:
        b.train_step(half)
    b.optimizer_step(1e-3)
    pa, pb = a.get_parameters(), b.get_parameters()
    for name in pa:
        np.testing.assert_allclose(pa[name], pb[name], atol=0.2 * 1e-3, err_msg=name)


def test_early_stopping_keeps_the_best_epoch(tiny_bundle, banking):
    train_data, test_data = banking
    tiny_train, _ = split(train_data, 0.9, seed=0)  # 10% of the small set: it overfits quickly
    config = TrainConfig(epochs=12, learning_rate=5e-2, early_stopping_patience=2, progress=False, warmup_ratio=0)
    result = train(tiny_bundle, tiny_train, config, test_data)
    losses = [r["val_loss"] for r in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1
    assert result.stopped_early and len(result.history) == result.best_epoch + 2
    session = TrainingSession(tiny_bundle)
    session.set_parameters(result.parameters)
    assert evaluate(session, test_data, "classification", 0)["loss"] == pytest.approx(min(losses), rel=1e-5)


def test_early_stopping_needs_a_validation_split(tiny_bundle, banking):
    with pytest.raises(ConfigError, match="validation"):
        train(tiny_bundle, banking[0], TrainConfig(early_stopping_patience=1, progress=False))
