"""Time-step schedules: where in [0, 1] training draws t, and where fixed-step samplers place their grid.

SiT's convention: t = 0 is noise, t = 1 is data (x_t = alpha_t x1 + sigma_t x0, alpha_0 = 0).

- uniform: t ~ U(0, 1), the original's draw (`torch.rand`), unchanged.
- logit-normal (SD3, LightningDiT): t = sigmoid(m + s * n), n ~ N(0, 1).
- shift s (SD3, LightningDiT): the monotone map t -> t / (t + s (1 - t)) of [0, 1] onto itself,
  which moves mass toward noise for s > 1.

The shift's form: SD3 writes its time u with u = 1 at noise, u -> s u / (1 + (s - 1) u). Our time
is t = 1 - u, so t' = 1 - u' = (1 - u) / (1 + (s - 1) u) = t / (t + s (1 - t)): the same map seen
from the other end (LightningDiT's SiT-based sampler uses exactly this form on its t grid).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch as th

UNIFORM = "uniform"
LOGIT_NORMAL = "logit-normal"
TIME_SAMPLINGS = (UNIFORM, LOGIT_NORMAL)


def shift_time(t: th.Tensor, shift: float) -> th.Tensor:
    """The shifted time t / (t + shift (1 - t)) (t = 0 noise, t = 1 data): fixes 0 and 1, increasing
    in t, and for shift > 1 below t everywhere inside (more time near the noise end). t: any shape."""
    if shift <= 0:
        raise ValueError(f"the time shift must be positive, got {shift}")
    return t / (t + shift * (1 - t))


def shifted_unit_grid(positions: th.Tensor, shift: Optional[float], low: float, high: float) -> th.Tensor:
    """A sampler's time grid with the shift applied inside its interval [low, high]: each time is
    mapped to u = (t - low) / (high - low) in [0, 1], shifted, and mapped back, so the end points stay
    and the meaning (more steps near the noise end, t = low) holds in either direction of integration.
    positions: (n,) times in [low, high]; shift None (or 1): unchanged."""
    if shift is None or shift == 1:
        return positions
    width = high - low
    return low + width * shift_time((positions - low) / width, shift)


@dataclass(frozen=True)
class TimeSchedule:
    """How training draws t in [0, 1] (before the transport maps it into its [t0, t1]).

    sampling: "uniform" or "logit-normal"; mean, std: the logit-normal's normal (m, s);
    shift: the shift s (None: none).
    """
    sampling: str = UNIFORM
    mean: float = 0.0
    std: float = 1.0
    shift: Optional[float] = None

    def __post_init__(self):
        if self.sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {self.sampling!r}; choose one of {', '.join(TIME_SAMPLINGS)}")
        if self.std <= 0:
            raise ValueError(f"the logit-normal std must be positive, got {self.std}")
        if self.shift is not None and self.shift <= 0:
            raise ValueError(f"the time shift must be positive, got {self.shift}")

    @property
    def is_original(self) -> bool:
        """Uniform without a shift: the original's draw."""
        return self.sampling == UNIFORM and self.shift in (None, 1)

    def draw(self, batch_size: int) -> th.Tensor:
        """(batch_size,) float32 times on the CPU generator: one torch.rand (uniform, the original's
        draw) or one torch.randn (logit-normal), then the shift."""
        if self.sampling == UNIFORM:
            t = th.rand((batch_size,))
        else:
            t = th.sigmoid(self.mean + self.std * th.randn((batch_size,)))
        if self.shift is not None and self.shift != 1:
            t = shift_time(t, self.shift)
        return t
