"""Learning-rate schedules as pure functions of the optimizer step."""

from __future__ import annotations


def warmup_linear(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then linear decay to 0 at ``total_steps``.

    ``step`` counts optimizer steps from 0; the same shape as transformers' get_linear_schedule_with_warmup.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * step / warmup_steps
    remaining = max(total_steps - warmup_steps, 1)
    return base_lr * max(0.0, (total_steps - step) / remaining)
