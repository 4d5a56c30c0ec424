"""Self-healing training: a non-finite or spiking loss rolls every rank back to the last good state (a
CPU copy of the whole TrainCheckpoint), skips the batch (epoch, batch) that caused it, and training goes on;
after --max-rollbacks it stops as without it. Checkpoints keep this module's state under "healing".
docs/training.md has the rules (rollback points, spikes, --skip-batches)."""
from __future__ import annotations

import argparse
import logging
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from sit.background import cpu_snapshot
from sit.checkpoint import TrainCheckpoint
from sit.cli import non_negative_int, positive_float, positive_int
from sit.declarations import Needs, declare
from sit.errors import UsageError
from sit.training.extensions import ExtensionContext, Feature, LoopExtension
from sit.training.monitor import TrainingDiverged

SPIKE_WINDOW = 100  # the running median is over this many recent steps' losses
SPIKE_MIN_HISTORY = 10  # no spike is called before this many losses were seen

BatchPosition = tuple[int, int]  # (epoch, batch within the epoch)


def batch_positions(value: str) -> tuple[BatchPosition, ...]:
    """argparse type of --skip-batches: comma-separated EPOCH:BATCH pairs of non-negative integers."""
    try:
        pairs = [tuple(int(number) for number in part.split(":")) for part in value.split(",") if part.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(pair) != 2 or min(pair) < 0 for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected comma-separated EPOCH:BATCH pairs such as 0:7,2:31, got {value!r}")
    return tuple(sorted(set(pairs)))  # type: ignore[arg-type]


@dataclass(frozen=True)
class HealingSettings:
    """The self-healing flags (all off: today's behaviour)."""
    TITLE: ClassVar[str] = "self-healing (off by default)"
    DDP_ONLY: ClassVar[tuple[str, str]] = ("--max-rollbacks, --spike-factor, --skip-batches",
                                           "its in-memory copies hold whole tensors; FSDP2 ranks hold shards")
    max_rollbacks: int = declare(
        0, "on a non-finite (or, with --spike-factor, spiking) loss, roll back to the last good state and skip the "
           "batch that caused it, at most this many times in a run; then stop (exit 1, the last good checkpoint "
           "kept). 0: stop at the first (the default)", type=non_negative_int)
    spike_factor: Optional[float] = declare(
        None, f"a loss above this factor x the median of the last {SPIKE_WINDOW} steps' losses diverged too "
              f"(default: only non-finite losses)", type=positive_float)
    rollback_every: Optional[int] = declare(
        None, "steps between rollback points kept in CPU memory (default: --ckpt-every; there is one at every "
              "checkpoint too)", type=positive_int,
        needs=Needs("--max-rollbacks N", lambda settings: settings.max_rollbacks > 0))
    skip_batches: Optional[tuple[BatchPosition, ...]] = declare(
        None, "EPOCH:BATCH,... batches to skip from the start, e.g. those a healed run skipped", type=batch_positions)

    @property
    def enabled(self) -> bool:
        return self.max_rollbacks > 0 or self.spike_factor is not None or bool(self.skip_batches)

    def check(self, config: Any = None) -> None:
        """UsageError (one line naming the flag) for settings that cannot work."""
        if self.spike_factor is not None and self.spike_factor <= 1.0:
            raise UsageError(f"--spike-factor must be above 1 (a factor of the median loss), got {self.spike_factor}")

    def check_data(self, batches_per_epoch: int, epochs: int) -> None:
        """UsageError naming --skip-batches when a batch it names is not one of this data's (it would skip nothing)."""
        outside = [f"{epoch}:{batch}" for epoch, batch in self.skip_batches or ()
                   if batch >= batches_per_epoch or epoch >= epochs]
        if outside:
            raise UsageError(f"--skip-batches {','.join(outside)}: an epoch here has batches 0..{batches_per_epoch - 1} "
                             f"(and the run epochs 0..{epochs - 1}), so nothing would be skipped; name batches of "
                             f"this data and --global-batch-size")


class LossSpiked(TrainingDiverged):
    """A loss above --spike-factor x the running median."""


class Healer(LoopExtension):
    """The rollback point, the batches to skip, each step's batch since the point, the rollbacks done and
    the spike check's window of losses."""
    name = "healing"

    def __init__(self, settings: HealingSettings, ckpt_every: int, saved: Optional[dict] = None):
        saved = saved or {}
        self.settings = settings
        self.inspects_losses = settings.spike_factor is not None
        self.every = settings.rollback_every or ckpt_every
        self.skipped: set[BatchPosition] = {tuple(pair) for pair in saved.get("skipped_batches", [])}
        self.skipped.update(settings.skip_batches or ())
        self.rollbacks: list[dict] = list(saved.get("rollbacks", []))
        self.recent_losses: deque[float] = deque(saved.get("recent_losses", []), maxlen=SPIKE_WINDOW)
        self.reference: Optional[float] = saved.get("spike_reference")  # the median at the last good state
        self.positions: dict[int, BatchPosition] = {}  # step -> the batch it trained on
        self.point: Optional[TrainCheckpoint] = None

    def state_dict(self) -> dict:
        """What a checkpoint keeps (only what is not empty)."""
        state = {"skipped_batches": [list(pair) for pair in sorted(self.skipped)], "rollbacks": list(self.rollbacks),
                 "recent_losses": list(self.recent_losses), "spike_reference": self.reference}
        return {key: value for key, value in state.items() if value}

    def skips(self, epoch: int, batch: int, next_step: int) -> bool:
        """Whether to drop the batch at (epoch, batch); else remember it as the data of step next_step."""
        if (epoch, batch) in self.skipped:
            return True
        if self.settings.max_rollbacks > 0:  # only a rollback asks, and only since the last point
            self.positions[next_step] = (epoch, batch)
        return False

    def inspect_loss(self, step: int, loss: float) -> None:
        """The spike check of one step's finite loss: against the median at the last good state (a diverging
        run's running median would follow it up), else the running median."""
        factor = self.settings.spike_factor
        if factor is not None and (self.reference is not None or len(self.recent_losses) >= SPIKE_MIN_HISTORY):
            median, what = ((self.reference, "the median at the last good state") if self.reference is not None
                            else (statistics.median(self.recent_losses), "the running median"))
            if loss > factor * median:
                raise LossSpiked(f"the loss spiked to {loss:.4f} at step {step} (above {factor} x {what} "
                                 f"{median:.4f})", step)
        self.recent_losses.append(loss)

    def found_good(self) -> None:
        """The losses so far passed the checks: their median is the spike check's reference from now on."""
        if len(self.recent_losses) >= SPIKE_MIN_HISTORY:
            self.reference = statistics.median(self.recent_losses)

    def keep(self, checkpoint: TrainCheckpoint) -> None:
        """Make a checked state the rollback point (a CPU copy; none without --max-rollbacks)."""
        self.found_good()
        if self.settings.max_rollbacks == 0:
            return
        self.point = TrainCheckpoint.from_dict(cpu_snapshot(checkpoint.to_dict())[0])
        self.positions = {step: position for step, position in self.positions.items() if step > checkpoint.train_steps}

    def roll_back(self, error: TrainingDiverged, logger: logging.Logger) -> TrainCheckpoint:
        """Note the rollback for `error` and the batch to skip; returns a copy of the rollback point to
        restore. Raises TrainingDiverged (the run stops) without a point or after --max-rollbacks."""
        limit = self.settings.max_rollbacks
        if self.point is None or limit == 0:
            raise error
        if len(self.rollbacks) >= limit:
            done = f"{len(self.rollbacks)} rollback" + ("s" if len(self.rollbacks) != 1 else "")
            raise TrainingDiverged(f"{error}, after {done} (--max-rollbacks {limit}); {self.diagnosis()}",
                                   error.step) from None
        position = self.positions.get(error.step) if error.step is not None else None
        if position is not None:
            self.skipped.add(position)
        point = self.point
        self.rollbacks.append({"step": error.step, "reason": str(error), "restored_step": point.train_steps,
                               "skipped_batch": list(position) if position else None})
        skipped = (f"skipping batch {position[1]} of epoch {position[0]} (the data of step {error.step})"
                   if position else "the batch that caused it is unknown, none is skipped")
        logger.warning(f"warning: rollback {len(self.rollbacks)} of {limit}: {error}; restoring step "
                       f"{point.train_steps} (epoch {point.epoch}, batch {point.epoch_step}), {skipped}")
        saved = point.extensions.get("healing", {})
        self.recent_losses = deque(saved.get("recent_losses", []), maxlen=SPIKE_WINDOW)
        self.reference = saved.get("spike_reference")
        self.positions = {}
        return TrainCheckpoint.from_dict(cpu_snapshot(point.to_dict())[0])  # AdamW may keep what it loads

    def diagnosis(self) -> str:
        """What the rollbacks done suggest, for the run's last line."""
        restored = {rollback["restored_step"] for rollback in self.rollbacks}
        if len(restored) == 1:
            return (f"every rollback went back to step {restored.pop()} and the loss diverged again whichever batch "
                    f"was skipped, so the data is an unlikely cause: lower --lr, or clip with --max-grad-norm")
        batches = [tuple(rollback["skipped_batch"]) for rollback in self.rollbacks if rollback["skipped_batch"]]
        return (f"the loss diverged at different places (skipped batches {batches}): look at the data there, or "
                f"lower --lr")

    # The loop's hooks (sit.training.extensions.LoopExtension)
    def start(self, run: Any) -> None:
        if self.settings.max_rollbacks:
            self.keep_point(run)  # the first rollback point: the start

    def checkpoint_saved(self, run: Any, checkpoint: TrainCheckpoint) -> None:
        self.keep(checkpoint)

    def step_done(self, run: Any, saved: bool) -> None:
        if not saved and self.settings.max_rollbacks > 0 and run.state.train_steps % self.every == 0:
            self.keep_point(run)

    def loop_done(self, run: Any) -> None:
        run.check_health()  # the steps since the last check, inside the rollbacks' reach

    def keep_point(self, run: Any) -> None:
        """Check health (every loss so far, every weight), then keep the state in CPU memory to roll back to."""
        run.check_health()
        self.keep(run.checkpoint())

    def recover(self, run: Any, error: TrainingDiverged) -> bool:
        """Restore the rollback point as a resume would, skipping the batch that diverged (or re-raise)."""
        run.restore(self.roll_back(error, run.logger))
        return True


def setup_healing(settings: HealingSettings, context: ExtensionContext) -> Optional[Healer]:
    """The run's healer: with self-healing flags, or resuming a run that had them (its skips stay)."""
    if not (settings.enabled or context.saved):
        return None
    return Healer(settings, context.config.run.ckpt_every, context.saved)


FEATURE = Feature("healing", HealingSettings, extension=setup_healing)
