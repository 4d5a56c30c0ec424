"""MeanFlow sampling (mode `MeanFlow`): N jumps z_{k+1} = z_k + (t_{k+1} - t_k) u(z_k, t_k, r = t_{k+1}) of a
model trained with --objective meanflow, on equal (or shifted) intervals of [0, 1] (docs/meanflow.md)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from sit.config import SamplerFamily
from transport import Sampler, SampleFunction
from transport.schedules import shifted_unit_grid

MEANFLOW_METHOD = "meanflow"


def add_meanflow_flags(parser: argparse.ArgumentParser) -> None:
    """The MeanFlow mode's flag group."""
    group = parser.add_argument_group("MeanFlow arguments")
    group.add_argument("--sampling-method", type=str, default=MEANFLOW_METHOD, choices=[MEANFLOW_METHOD],
                       help="jumps of the average velocity z_r = z_t + (r - t) u(z_t, t, r); --num-sampling-steps "
                            "of them (1 or 2 for MeanFlow's published numbers)")


def meanflow_sample(x: torch.Tensor, model: Callable, num_steps: int, time_shift: Optional[float] = None,
                    **model_kwargs) -> torch.Tensor:
    """num_steps jumps from noise x (N, C, H, W) at t = 0 to data at t = 1 of an average-velocity model
    model(x, t, r=r, **model_kwargs); returns the samples (N, C, H, W)."""
    grid = shifted_unit_grid(torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64), time_shift, 0.0, 1.0)
    for t, r in zip(grid[:-1].tolist(), grid[1:].tolist()):
        t_batch, r_batch = (torch.full((len(x),), value, device=x.device) for value in (t, r))
        x = x + (r - t) * model(x, t_batch, r=r_batch, **model_kwargs).to(x.dtype)
    return x


@dataclass(frozen=True)
class MeanFlowConfig(SamplerFamily):
    """MeanFlow's few-step sampler (see the module docstring)."""
    sampling_method: str = MEANFLOW_METHOD
    num_steps: int = 1
    time_shift: Optional[float] = None

    mode = "MeanFlow"
    title = "MeanFlow (1- or few-step, models trained with --objective meanflow)"
    add_flags = staticmethod(add_meanflow_flags)
    average_velocity = True
    min_steps = 1

    def describe(self) -> str:
        """E.g. `MeanFlow, 2 steps`."""
        shift = f" (time shift {self.time_shift:g})" if self.time_shift is not None else ""
        return f"MeanFlow, {self.num_steps} step{'s' if self.num_steps > 1 else ''}{shift}"

    def sample_fn(self, sampler: Sampler, keep_trajectory: bool = False) -> Callable:
        return SampleFunction(lambda x, model, **kwargs: [meanflow_sample(x, model, self.num_steps, self.time_shift,
                                                                          **kwargs)])
