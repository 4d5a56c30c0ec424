"""The loss while training: kept on the device, averaged over ranks when logged, and checked for divergence."""
from __future__ import annotations

import logging
import math
from time import time
from typing import Any, Callable, Optional, Sequence

import torch

from sit.distributed import all_reduce_mean, any_rank
from sit.errors import RunFailure
from sit.training.sharding import local_tensor
from sit.training.step import StepResult


class TrainingDiverged(RunFailure):
    """The loss or the weights became non-finite; `step`: the first step found bad, when known."""

    def __init__(self, message: str, step: Optional[int] = None):
        super().__init__(message)
        self.step = step


class LossMonitor:
    """Per-step losses kept on the device (no host sync per step), reduced over ranks when logged."""

    def __init__(self, first_step: int, inspectors: Sequence[Callable[[int, float], None]] = ()):
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []  # with --max-grad-norm: the norms before clipping
        self.terms: dict[str, list[torch.Tensor]] = {}  # further loss terms by log name (REPA's alignment)
        self.first_step = first_step  # the step of losses[0]
        self.start_time = time()
        self.inspectors = inspectors  # each called once per step, in order, with its finite loss (the spike check)
        self.inspected_through = first_step - 1
        self.logged: Optional[dict[str, Any]] = None  # the values of the last log line (log_progress), until taken

    def take_logged(self) -> Optional[dict[str, Any]]:
        """The values of the last log line not taken yet (see log_progress), or None; clears them."""
        logged, self.logged = self.logged, None
        return logged

    def add(self, result: StepResult) -> None:
        """A step's loss, each further term's (averaged and checked like the loss) and its gradient norm."""
        self.losses.append(result.loss.detach())
        for name, value in result.terms.items():
            self.terms.setdefault(name, []).append(value.detach())
        if result.grad_norm is not None:
            self.grad_norms.append(result.grad_norm.detach())

    def reduced_terms(self) -> dict[str, list[float]]:
        """The pending further terms averaged over ranks (a collective), as floats; kept until flushed."""
        return {name: all_reduce_mean(torch.stack(values).float()).tolist() for name, values in self.terms.items() if values}

    def flush_terms(self) -> dict[str, float]:
        """Each further term's mean since the last flush, after checking that it is finite; clears them."""
        means = {}
        for name, values in self.reduced_terms().items():
            self.check(values, name)
            means[name] = sum(values) / len(values)
        self.terms = {}
        return means

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

    def check(self, values: list[float], what: str = "loss") -> None:
        """TrainingDiverged naming the first step whose loss (or other term) is not finite, or whose
        loss an inspector refuses (a spike)."""
        for offset, value in enumerate(values):
            step = self.first_step + offset
            if not math.isfinite(value):
                raise TrainingDiverged(f"the {what} became non-finite ({value}) at step {step}", step)
            if what == "loss" and step > self.inspected_through:
                for inspect in self.inspectors:
                    inspect(step, value)
                self.inspected_through = step

    def flush(self, next_step: int) -> tuple[float, float]:
        """(mean loss, steps/s) since the last flush, after checking that every loss is finite."""
        values = self.reduced()
        self.check(values)
        steps_per_sec = len(values) / max(time() - self.start_time, 1e-9)
        self.losses, self.first_step, self.start_time = [], next_step, time()
        return sum(values) / max(len(values), 1), steps_per_sec


def log_progress(monitor: LossMonitor, step: int, global_batch_size: int, logger: logging.Logger,
                 wandb_run: Any) -> None:
    """Log the loss averaged over ranks and steps since the last log line, each term's, steps/s, images/s and
    the grad norm; they are kept as monitor.logged (for the metrics log)."""
    terms = monitor.flush_terms()
    average_loss, steps_per_sec = monitor.flush(step + 1)
    images_per_sec = steps_per_sec * global_batch_size
    grad_norm = monitor.mean_grad_norm()
    logger.info(f"(step={step:07d}) Train Loss: {average_loss:.4f}, "
                + "".join(f"{name}: {value:.4f}, " for name, value in terms.items())
                + f"Train Steps/Sec: {steps_per_sec:.2f}, Images/Sec: {images_per_sec:.1f}"
                + (f", Grad Norm: {grad_norm:.4f}" if grad_norm is not None else ""))
    if wandb_run is not None:
        wandb_run.log({"train loss": average_loss, "train steps/sec": steps_per_sec, "train images/sec": images_per_sec,
                       **{name.lower(): value for name, value in terms.items()}}, step=step)
    monitor.logged = {"step": step, "loss": average_loss, "terms": terms, "grad_norm": grad_norm,
                      "steps_per_sec": steps_per_sec, "images_per_sec": images_per_sec}


def log_first_loss(monitor: LossMonitor, step: int, logger: logging.Logger) -> None:
    """Log the run's first loss at once (a collective); the pending losses stay for the next regular line."""
    values = monitor.reduced()
    monitor.check(values)
    logger.info(f"(step={step:07d}) Train Loss: {values[-1]:.4f} (first step of this run)")


def check_health(model: torch.nn.Module, monitor: LossMonitor, step: int) -> None:
    """Raise TrainingDiverged if a pending loss or any weight is non-finite (all ranks call this)."""
    monitor.check(monitor.reduced())
    for name, values in monitor.reduced_terms().items():
        monitor.check(values, name)
    finite = torch.stack([torch.isfinite(local_tensor(param)).all() for param in model.parameters()]).all()
    if any_rank(not finite.item(), finite.device):  # FSDP: each rank sees its shards; every rank learns of any
        raise TrainingDiverged(f"the weights became non-finite by step {step}", step)  # its losses were finite
