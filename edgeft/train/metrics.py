"""Evaluation metrics as small pure numpy functions."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def cross_entropy_sum(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """Summed cross-entropy over positions whose label is not -100, and how many there were."""
    logits = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    if not keep.any():
        return 0.0, 0
    logp = log_softmax(logits[keep])
    return float(-logp[np.arange(keep.sum()), labels[keep]].sum()), int(keep.sum())


def causal_lm_loss_sum(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """Next-token cross-entropy summed over predicted tokens (labels shifted by one)."""
    return cross_entropy_sum(logits[:, :-1, :], labels[:, 1:])


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 over the classes present in y_true or y_pred."""
    classes = np.union1d(y_true, y_pred)
    precision, recall, f1 = [], [], []
    for c in classes:
        tp = float(np.sum((y_pred == c) & (y_true == c)))
        predicted, actual = float(np.sum(y_pred == c)), float(np.sum(y_true == c))
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    return {"accuracy": float(np.mean(y_true == y_pred)), "macro_precision": float(np.mean(precision)),
            "macro_recall": float(np.mean(recall)), "macro_f1": float(np.mean(f1))}


def multilabel_metrics(targets: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Exact-match accuracy and macro F1 with a 0.5 probability threshold."""
    pred = logits > 0
    true = targets > 0.5
    tp = (pred & true).sum(axis=0)
    denom = pred.sum(axis=0) + true.sum(axis=0)
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return {"exact_match": float(np.mean((pred == true).all(axis=1))), "macro_f1": float(f1.mean())}


def bce_mean(logits: np.ndarray, targets: np.ndarray) -> float:
    x = logits.astype(np.float64)
    return float(np.mean(np.maximum(x, 0) - x * targets + np.log1p(np.exp(-np.abs(x)))))


class Accumulator:
    """Collects (logits, labels) batch by batch and reports the task's metrics at the end."""

    def __init__(self, task: str):
        self.task = task
        self.loss_sum, self.count = 0.0, 0
        self.preds: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def add(self, logits: np.ndarray, labels: np.ndarray) -> None:
        if self.task == "causal-lm":
            self.add_sums(*causal_lm_loss_sum(logits, labels))
            return
        if self.task == "classification":
            total, n = cross_entropy_sum(logits, labels)
            self.loss_sum += total
            self.count += n
            self.preds.append(logits.argmax(-1))
        else:
            self.preds.append(logits)
        self.labels.append(labels)

    def add_sums(self, loss_sum: float, count: int) -> None:
        """A causal LM's batch as its summed next-token loss and labelled-token count."""
        self.loss_sum += loss_sum
        self.count += count

    def result(self) -> dict[str, float]:
        if self.task == "causal-lm":
            loss = self.loss_sum / max(self.count, 1)
            return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "tokens": self.count}
        labels = np.concatenate(self.labels)
        preds = np.concatenate(self.preds)
        if self.task == "classification":
            return {"loss": self.loss_sum / max(self.count, 1), **classification_metrics(labels, preds)}
        if self.task == "regression":
            mse = float(np.mean((preds.astype(np.float64) - labels) ** 2))
            return {"loss": mse, "mse": mse}
        return {"loss": bce_mean(preds, labels), **multilabel_metrics(labels, preds)}


def higher_is_better(metric: str) -> bool:
    return metric not in ("loss", "mse", "perplexity")
