"""From the command line's values to a running job: `prepare_training` does every check and opens
the data before any heavy work (no VAE, no process group); `run_training` joins the ranks, trains,
and turns a divergence into a one-line failure."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import AbstractSet, Any, Mapping

from sit.checkpoint import settings_of
from sit.distributed import cleanup_distributed, setup_distributed
from sit.errors import RunFailure, UsageError
from sit.training.data import TrainDataset, features_vae, open_training_data
from sit.training.experiment import StartPoint, start_checkpoint
from sit.training.loop import train
from sit.training.monitor import TrainingDiverged
from sit.training.phema import check_phema_start
from sit.training.settings import TrainConfig, check_train_config, resolve_train_config
from sit.training.signals import StopSignal


@dataclass
class TrainingPlan:
    """A checked run: its configuration, data, starting point and the warnings to log once it runs."""
    config: TrainConfig
    dataset: TrainDataset
    start: StartPoint
    warnings: list[str]


def prepare_training(flags: Mapping[str, Any], explicit: AbstractSet[str], world_size: int) -> TrainingPlan:
    """Find and load the checkpoint to start from, resolve the configuration against it, check it and
    open the data. flags: every parsed flag (vars(args)); explicit: those the command line gave;
    world_size: the processes launched. Raises UsageError with a one-line message."""
    start = start_checkpoint(flags["ckpt"], flags["resume"], flags["results_dir"])
    stored, train_steps = (settings_of(start.checkpoint), start.checkpoint["train_steps"]) if start.resuming else (None, 0)
    made_by = features_vae(flags["feature_path"]) if flags["feature_path"] is not None else None
    config, warnings = resolve_train_config(flags, explicit, stored, source=f"the checkpoint {start.source}",
                                            train_steps=train_steps, features_vae=made_by)
    check_train_config(config, world_size)
    if config.repa.enabled and start.resuming and start.checkpoint.get("repa_projector") is None:
        raise UsageError(f"--repa-encoder: {start.source} was trained without representation alignment; "
                         f"start a new experiment")
    check_phema_start(config.phema, start.checkpoint if start.resuming else None)
    return TrainingPlan(config, open_training_data(config), start, start.warnings + warnings)


def run_training(plan: TrainingPlan) -> None:
    """Join the job and train the plan; SIGTERM/SIGINT stop after a checkpoint (a normal return).

    Raises RunFailure when training diverges (the last good checkpoint is kept)."""
    stop = StopSignal()
    stop.install()
    ctx = setup_distributed()
    stop.connect()
    try:
        train(plan.config, ctx=ctx, dataset=plan.dataset, start=plan.start, warnings=plan.warnings, stop=stop)
    except TrainingDiverged as error:
        message = f"{error}; stopping, the last good checkpoint is kept"
        logging.getLogger("sit").error(message)
        raise RunFailure(message) from None
    finally:
        cleanup_distributed()
