"""Features of a training run, each one module: its declared settings (sit.declarations), and what it adds
to the run: a loss term (sit.training.terms) or a loop extension (below). sit.training.registry lists them.

A loop extension is something the loop does beside the step: post-hoc EMA snapshots, self-healing. It
says what it keeps (`state_dict`, stored in the checkpoint under its `name`; `restore` after a
rollback) and what it does at each point of the loop. Each hook receives the `TrainingRun`
(sit.training.loop), whose services it may use: `run.check_health()`, `run.write_on_main(...)`,
`run.checkpoint()`, `run.restore(checkpoint)`.
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
    """What a loop extension's setup may use: the run's configuration, the model being trained, and the
    resumed checkpoint's state of this extension (None: a new run, or the checkpoint has none)."""
    config: Any
    model: torch.nn.Module
    saved: Optional[dict]


@dataclass(frozen=True)
class Feature:
    """One feature of a training run: its settings dataclass (None: it has no flags) and how it joins the
    run, as a loss term, a loop extension or the step's objective (each setup returns None when its
    settings leave it off)."""
    name: str
    settings: Optional[type] = None
    term: Optional[Callable[[Any, TermContext], Optional[TermFactory]]] = None
    extension: Optional[Callable[[Any, ExtensionContext], Optional[LoopExtension]]] = None
    objective: Optional[Callable[[Any], Optional[Objective]]] = None
