"""Time-step schedules (t = 0 noise, t = 1 data): where training draws t (uniform, the original's, or
logit-normal) and SD3's shift t -> t / (t + s (1 - t)) of draws and fixed-step grids (docs/training.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch as th

UNIFORM = "uniform"
LOGIT_NORMAL = "logit-normal"
TIME_SAMPLINGS = (UNIFORM, LOGIT_NORMAL)


def shift_time(t: th.Tensor, shift: float) -> th.Tensor:
    """The shifted time t / (t + shift (1 - t)) of t (any shape): shift > 1 moves t toward noise."""
    if shift <= 0:
        raise ValueError(f"the time shift must be positive, got {shift}")
    return t / (t + shift * (1 - t))


def shifted_unit_grid(positions: th.Tensor, shift: Optional[float], low: float, high: float) -> th.Tensor:
    """A sampler's time grid positions: (n,) in [low, high], shifted inside that interval (mapped to [0, 1]
    and back, so the ends stay in either direction of integration); shift None (or 1): unchanged."""
    if shift is None or shift == 1:
        return positions
    width = high - low
    return low + width * shift_time((positions - low) / width, shift)


@dataclass(frozen=True)
class TimeSchedule:
    """How training draws t in [0, 1] (before the transport maps it into [t0, t1]): sampling "uniform" or
    "logit-normal" (of a normal of mean, std), then the shift (None: none)."""
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
