"""The training losses, written in torch so they export into the training graph with the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Classification: logits [B, C], integer labels [B].

    Written as the mean of the labels' negative log-softmax: torch exports ``F.cross_entropy`` as ONNX's
    SoftmaxCrossEntropyLoss with its loss output only, and ONNX Runtime's gradient builder needs its second
    output (log_prob), so a model whose every layer trains (an MLP) could not export for the ort-training engine
    ("i < node_->OutputDefs().size() was false")."""
    return -F.log_softmax(logits, dim=-1).gather(1, labels.unsqueeze(1)).mean()


def causal_lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits [B, T, V], labels [B, T]; padding positions carry -100."""
    shifted = logits[:, :-1, :]
    targets = labels[:, 1:]
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def mse(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Regression: predictions [B, K], float targets [B, K]."""
    return F.mse_loss(logits, labels)


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label: logits [B, C], multi-hot float targets [B, C].

    Written in the stable form max(x, 0) - x*y + log(1 + exp(-|x|)) with |x| = relu(x) + relu(-x):
    torch exports binary_cross_entropy_with_logits as Log(Sigmoid(x)), which turns into NaN once a
    logit saturates, and ORT has no gradient for Abs.
    """
    positive, negative = F.relu(logits), F.relu(-logits)
    return (positive - logits * labels + torch.log1p(torch.exp(-(positive + negative)))).mean()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's summed log-probability of its labelled tokens (next-token; -100: not counted), [B]."""
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).to(logits.dtype)
    logp = F.log_softmax(logits[:, :-1, :], dim=-1)
    picked = logp.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(dim=1)


def dpo(logits: torch.Tensor, labels: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO: logits [2B, T, V] of B chosen then B rejected sequences; labels [2B, T + 1] float: the token labels
    (-100 outside the response) and, last, each sequence's reference log-probability (the frozen base's).
    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), written as softplus(-x) = relu(-x) + log1p(exp(-|x|))
    with |x| = relu(x) + relu(-x) (no Abs: ORT has no gradient for it; no Log(Sigmoid): it saturates to -inf)."""
    logps = sequence_logps(logits, labels[:, :-1].long())
    rewards = logps - labels[:, -1]
    half = rewards.shape[0] // 2
    x = beta * (rewards[:half] - rewards[half:])
    return (F.relu(-x) + torch.log1p(torch.exp(-(F.relu(x) + F.relu(-x))))).mean()


LOSS_FUNCTIONS = {
    "cross-entropy": cross_entropy,
    "causal-lm-cross-entropy": causal_lm_cross_entropy,
    "mse": mse,
    "bce": bce,
    "dpo": dpo,
}

# dtype and rank of the labels input each loss expects (the device builds its batches from this).
LABEL_SPEC = {
    "cross-entropy": ("int64", ["batch"]),
    "causal-lm-cross-entropy": ("int64", ["batch", "sequence"]),
    "mse": ("float32", ["batch", "outputs"]),
    "bce": ("float32", ["batch", "outputs"]),
    # token labels as floats (exact below 2^24) with each sequence's reference log-probability appended
    "dpo": ("float32", ["batch", "label_length"]),
}
