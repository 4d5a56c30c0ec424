"""Features of a training run (sit.training.registry lists them), and the loop extension interface: what
the loop does beside the step (post-hoc EMA snapshots, self-healing). An extension keeps `state_dict`
(the checkpoint's, under its `name`; `restore` after a rollback) and overrides the hooks it needs; each
hook gets the `TrainingRun` (sit.training.loop) and its services: `check_health()`, `write_on_main(...)`,
`checkpoint()`, `restore(checkpoint)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from sit.training.monitor import TrainingDiverged
from sit.training.terms import Objective, TermContext, TermFactory


class LoopExtension:
    """A loop extension (see the module docstring); every hook does nothing unless overridden."""
    name: str = ""
    inspects_losses = False  # True: `inspect_loss` sees every step's finite loss (in order)

    def state_dict(self) -> dict:
        """What a checkpoint keeps of it, under `name` ({}: nothing is stored)."""
        return {}

    def restore(self, run: Any, state: dict) -> None:
        """Continue from a rollback point's state (the model in run.step is the restored one)."""

    def skips(self, epoch: int, batch: int, next_step: int) -> bool:
        """Whether the loop drops the batch at (epoch, batch) instead of training step next_step on it."""
        return False

    def inspect_loss(self, step: int, loss: float) -> None:
        """A step's finite loss (averaged over ranks); raise TrainingDiverged to call it a divergence."""

    def start(self, run: Any) -> None:
        """The run is set up (and restored when resuming), before its first step."""

    def after_step(self, run: Any) -> None:
        """Right after an optimizer step (run.state.train_steps counts it), before logging."""

    def measured(self, run: Any, name: str, value: float) -> None:
        """A metric of the model was measured at this step (e.g. "fid", every rank alike)."""

    def before_checkpoint(self, run: Any) -> None:
        """After a step's log line, previews and FID, before its checkpoint (if one is due)."""

    def checkpoint_saved(self, run: Any, checkpoint: Any) -> None:
        """A checkpoint of the current, checked state was written (a TrainCheckpoint)."""

    def step_done(self, run: Any, saved: bool) -> None:
        """The step is over; saved: whether a checkpoint was written at it."""

    def loop_done(self, run: Any) -> None:
        """The loop ended (its limit or a stop signal), still inside the rollbacks' reach."""

    def end(self, run: Any) -> None:
        """Before the final checkpoint."""

    def recover(self, run: Any, error: TrainingDiverged) -> bool:
        """Training diverged: return True after restoring a state to go on from, False to stop the run."""
        return False


@dataclass
class ExtensionContext:
    """What a loop extension's setup may use: the run's config, the model and its resumed state (or None)."""
    config: Any
    model: torch.nn.Module
    saved: Optional[dict]


@dataclass(frozen=True)
class Feature:
    """One feature of a training run: its settings dataclass (None: no flags) and how it joins the run (each
    setup returns None when its settings leave it off)."""
    name: str
    settings: Optional[type] = None
    term: Optional[Callable[[Any, TermContext], Optional[TermFactory]]] = None
    extension: Optional[Callable[[Any, ExtensionContext], Optional[LoopExtension]]] = None
    objective: Optional[Callable[[Any], Optional[Objective]]] = None
