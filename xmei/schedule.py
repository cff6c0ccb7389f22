"""The learning-rate schedule: linear warm-up, then cosine decay.

The published config names ``linear_warmup_cosine_lr`` but its code keeps the rate constant;
this one really warms from ``warmup_lr`` to ``init_lr`` over ``warmup_steps`` optimizer steps,
then follows a half cosine from ``init_lr`` down to ``min_lr`` at the last step. ``warmup_steps``
below 1 is a fraction of the run (``resolve_warmup``), so the warm-up keeps its share of the run
whatever the number of GPUs.
"""
from __future__ import annotations

import math

__all__ = ["linear_warmup_cosine_lr", "resolve_warmup"]

LONG_WARMUP = 0.3  # a fixed warm-up count over this share of the run gets a warning


def linear_warmup_cosine_lr(step: int, total_steps: int, init_lr: float, min_lr: float, warmup_lr: float,
                            warmup_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if step < warmup_steps:
        return warmup_lr + (init_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + 0.5 * (init_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def resolve_warmup(warmup_steps: int | float, total_steps: int) -> tuple[int, str | None]:
    """(warm-up optimizer steps, a warning or None): a fraction below 1 is a share of
    ``total_steps``; a fixed count that covers more than 30 % of the run is warned about."""
    if warmup_steps < 1:
        return round(warmup_steps * total_steps), None
    steps = int(warmup_steps)
    share = steps / max(total_steps, 1)
    if share > LONG_WARMUP:
        return steps, (f"run.warmup_steps {steps} covers {share:.0%} of the run's {total_steps} optimizer steps; "
                       f"give it as a fraction of the run instead, e.g. run.warmup_steps=0.03")
    return steps, None
