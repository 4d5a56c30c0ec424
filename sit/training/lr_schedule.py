"""Learning-rate schedules (--lr-schedule, --warmup-steps): the lr of step n = 1, 2, ... is a pure function
of n (base lr L, warmup W, total T = --max-steps), so a resume or rollback continues it exactly:
    constant       L (the original's; the optimizer's lr is never touched)
    warmup-cosine  L n / W for n <= W; then L (1 + cos(pi (n - W - 1) / (T - W))) / 2
    inverse-sqrt   L min(n / R, sqrt(R / n)) with R = max(W, 1)
It sets the lr of AdamW's first group (the SiT's); a loss term's own group keeps its lr.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from sit.errors import UsageError

CONSTANT = "constant"
WARMUP_COSINE = "warmup-cosine"
INVERSE_SQRT = "inverse-sqrt"
LR_SCHEDULES = (CONSTANT, WARMUP_COSINE, INVERSE_SQRT)


def scheduled_lr(schedule: str, base_lr: float, step: int, warmup_steps: int = 0,
                 total_steps: Optional[int] = None) -> float:
    """The lr of step `step` (1-based: the step being taken) under `schedule` (see the module docstring);
    warmup-cosine needs total_steps (check_schedule refuses a run without --max-steps)."""
    if schedule == CONSTANT:
        return base_lr
    if schedule == WARMUP_COSINE:
        if step <= warmup_steps:
            return base_lr * step / warmup_steps
        progress = min((step - warmup_steps - 1) / (total_steps - warmup_steps), 1.0)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == INVERSE_SQRT:
        reference = max(warmup_steps, 1)
        return base_lr * min(step / reference, math.sqrt(reference / step))
    raise ValueError(f"unknown lr schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")


def check_schedule(schedule: str, warmup_steps: int, max_steps: Optional[int]) -> None:
    """UsageError (one line naming the flags) for a schedule that cannot run with these settings."""
    if schedule != WARMUP_COSINE:
        return
    if max_steps is None:
        raise UsageError(f"--lr-schedule {WARMUP_COSINE} decays over the whole run and needs --max-steps (its "
                         f"length): add --max-steps N or choose another --lr-schedule")
    if warmup_steps >= max_steps:
        raise UsageError(f"--warmup-steps {warmup_steps} leaves no step of --max-steps {max_steps} for the cosine "
                         f"of --lr-schedule {WARMUP_COSINE}: lower --warmup-steps")


@dataclass(frozen=True)
class LRSchedule:
    """A schedule with its settings fixed: `lr(steps_done)` is the lr of the next step."""
    schedule: str
    base_lr: float
    warmup_steps: int = 0
    total_steps: Optional[int] = None

    def lr(self, steps_done: int) -> float:
        """The lr of the step taken after `steps_done` steps (the run's step steps_done + 1)."""
        return scheduled_lr(self.schedule, self.base_lr, steps_done + 1, self.warmup_steps, self.total_steps)


def schedule_of(optim: Any) -> Optional[LRSchedule]:
    """The run's schedule from its OptimSettings; None for the constant lr (the optimizer is left alone)."""
    if optim.lr_schedule == CONSTANT:
        return None
    return LRSchedule(optim.lr_schedule, optim.lr, optim.warmup_steps, optim.max_steps)
