"""The learning-rate schedule: linear warm-up, then cosine decay.

The published config names ``linear_warmup_cosine_lr`` but its code keeps the rate constant;
this one really warms from ``warmup_lr`` to ``init_lr`` over ``warmup_steps`` optimizer steps,
then follows a half cosine from ``init_lr`` down to ``min_lr`` at the last step.
"""
from __future__ import annotations

import math

__all__ = ["linear_warmup_cosine_lr"]


def linear_warmup_cosine_lr(step: int, total_steps: int, init_lr: float, min_lr: float, warmup_lr: float,
                            warmup_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if step < warmup_steps:
        return warmup_lr + (init_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + 0.5 * (init_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
