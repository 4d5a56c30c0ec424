"""The loss while training: kept on the device, averaged over ranks when logged, and checked for divergence."""
from __future__ import annotations

import logging
import math
from time import time
from typing import Any, Callable, Optional

import torch

from sit.distributed import all_reduce_mean, any_rank
from sit.errors import RunFailure


class TrainingDiverged(RunFailure):
    """The loss or the weights became non-finite; `step`: the first step found bad, when known."""

    def __init__(self, message: str, step: Optional[int] = None):
        super().__init__(message)
        self.step = step


class LossMonitor:
    """Per-step losses kept on the device (no host sync per step), reduced over ranks when logged."""

    def __init__(self, first_step: int, inspect: Optional[Callable[[int, float], None]] = None):
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []  # with --max-grad-norm: the norms before clipping
        self.first_step = first_step  # the step of losses[0]
        self.start_time = time()
        self.inspect = inspect  # called once per step, in order, with its finite loss (the spike check)
        self.inspected_through = first_step - 1

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach())

    def add_grad_norm(self, grad_norm: torch.Tensor) -> None:
        self.grad_norms.append(grad_norm.detach())

    def mean_grad_norm(self) -> Optional[float]:
        """The mean gradient norm since the last call (equal on all ranks after DDP), or None; clears it."""
        if not self.grad_norms:
            return None
        value = torch.stack(self.grad_norms).float().mean().item()
        self.grad_norms = []
        return value

    def reduced(self) -> list[float]:
        """The pending losses averaged over ranks (a collective), as floats."""
        if not self.losses:
            return []
        return all_reduce_mean(torch.stack(self.losses).float()).tolist()

    def check(self, values: list[float]) -> None:
        """TrainingDiverged naming the first step whose loss is not finite (or that `inspect` refuses)."""
        for offset, value in enumerate(values):
            step = self.first_step + offset
            if not math.isfinite(value):
                raise TrainingDiverged(f"the loss became non-finite ({value}) at step {step}", step)
            if self.inspect is not None and step > self.inspected_through:
                self.inspect(step, value)
                self.inspected_through = step

    def flush(self, next_step: int) -> tuple[float, float]:
        """(mean loss, steps/s) since the last flush, after checking that every loss is finite."""
        values = self.reduced()
        self.check(values)
        steps_per_sec = len(values) / max(time() - self.start_time, 1e-9)
        self.losses, self.first_step, self.start_time = [], next_step, time()
        return sum(values) / max(len(values), 1), steps_per_sec


def log_progress(monitor: LossMonitor, step: int, global_batch_size: int, logger: logging.Logger, wandb_run: Any) -> None:
    """Log the loss averaged over ranks and steps since the last log, steps/s and images/s."""
    average_loss, steps_per_sec = monitor.flush(step + 1)
    images_per_sec = steps_per_sec * global_batch_size
    grad_norm = monitor.mean_grad_norm()
    logger.info(f"(step={step:07d}) Train Loss: {average_loss:.4f}, Train Steps/Sec: {steps_per_sec:.2f}, "
                f"Images/Sec: {images_per_sec:.1f}" + (f", Grad Norm: {grad_norm:.4f}" if grad_norm is not None else ""))
    if wandb_run is not None:
        wandb_run.log({"train loss": average_loss, "train steps/sec": steps_per_sec,
                       "train images/sec": images_per_sec}, step=step)


def check_health(model: torch.nn.Module, monitor: LossMonitor, step: int) -> None:
    """Raise TrainingDiverged if a pending loss or any weight is non-finite (all ranks call this)."""
    monitor.check(monitor.reduced())
    finite = torch.stack([torch.isfinite(param).all() for param in model.parameters()]).all()
    if any_rank(not finite.item(), finite.device):  # agreed, also where ranks hold different shards of the weights
        raise TrainingDiverged(f"the weights became non-finite by step {step}", step)  # its losses were finite
