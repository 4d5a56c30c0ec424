"""From the command line's values to a running job: `plan_training` does every check and opens the data
before any heavy work; `run_training` judges the checkpoint and the free space, joins the ranks, trains,
and turns failures into one line (a run that fails before its first checkpoint removes its folder)."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import AbstractSet, Any, Mapping, Optional

from models import ModelConfig
from sit.checkpoint import check_epoch_position, check_train_checkpoint, settings_of
from sit.distributed import cleanup_distributed, launched_rank, launched_world_size, setup_distributed
from sit.errors import RunFailure, UsageError
from sit.latents.statistics import LatentStatistics
from sit.files import check_free_space
from sit.locks import folder_locks_released
from sit.training.checks import (check_checkpoint_settings, check_fid_reference, check_results_dir, nothing_left_to_do,
                                 unused_setting_warnings)
from sit.training.data import TrainDataset, features_vae, open_training_data
from sit.training.decoder import run_latent_statistics
from sit.training.experiment import StartPoint, discard_unfinished_experiments, experiment_dir_of, start_checkpoint
from sit.training.loop import train
from sit.training.monitor import TrainingDiverged
from sit.training.settings import TrainConfig, check_train_config, resolve_train_settings
from sit.training.signals import StopSignal


@dataclass
class TrainingPlan:
    """A checked run: its configuration, data, starting point and the warnings to log once it runs;
    `finished`: a resume with nothing left to do says this and does nothing."""
    config: TrainConfig
    dataset: TrainDataset
    start: StartPoint
    warnings: list[str]
    finished: Optional[str] = None
    latent_statistics: Optional[LatentStatistics] = None  # --latent-norm per-channel (sit.training.decoder)


def plan_training(flags: Mapping[str, Any], explicit: AbstractSet[str], world_size: int) -> TrainingPlan:
    """Load the checkpoint to start from, resolve the configuration against it, check it and open the data
    (flags: vars(args); explicit: those the command line gave). Raises UsageError with one line."""
    start = start_checkpoint(flags["ckpt"], flags["resume"], flags["results_dir"])
    stored, train_steps = (settings_of(start.checkpoint), start.checkpoint["train_steps"]) if start.resuming else (None, 0)
    made_by = features_vae(flags["feature_path"]) if flags["feature_path"] is not None else None
    config, resolved = resolve_train_settings(flags, explicit, stored, source=f"the checkpoint {start.source}",
                                              train_steps=train_steps, features_vae=made_by)
    check_checkpoint_settings(config, resolved, world_size)
    check_train_config(config, world_size)
    for settings in config.features.values():  # a feature that cannot start in the middle of a run
        if hasattr(settings, "check_start"):
            settings.check_start(start.checkpoint if start.resuming else None)
    warnings = resolved.warnings + unused_setting_warnings(config, explicit, start.resuming)
    check_results_dir(config, start.resuming)
    check_fid_reference(config)
    finished = nothing_left_to_do(config, start.checkpoint if start.resuming else None, start.source, explicit)
    dataset = open_training_data(config, resolved.origin)
    listing = [dataset.listing_warning] if getattr(dataset, "listing_warning", None) else []
    statistics = run_latent_statistics(config.model, config.data.feature_path, getattr(dataset, "meta", None),
                                       start.checkpoint if start.resuming else None, stored)
    return TrainingPlan(config, dataset, start, start.warnings + warnings + listing, finished, statistics)


def check_start(plan: TrainingPlan, world_size: int) -> None:
    """Before joining the job (and before any folder is made): a rank's share of the data holds a local batch,
    a checkpoint to resume is judged whole (and its place in this data's epoch), and the free space for the
    next checkpoint. Raises UsageError / NoSpaceLeft with one line."""
    start, config = plan.start, plan.config
    per_rank = -(-len(plan.dataset) // world_size)  # DistributedSampler pads to a multiple of the ranks
    local_batch_size = config.data.global_batch_size // world_size
    if per_rank < local_batch_size:  # no step could run
        raise UsageError(f"the dataset has {len(plan.dataset)} images, fewer than one global batch of "
                         f"{config.data.global_batch_size}: pass a smaller --global-batch-size")
    for settings in config.features.values():  # e.g. batches to skip that this data does not have
        if hasattr(settings, "check_data"):
            settings.check_data(per_rank // local_batch_size, config.optim.epochs)
    if start.resuming:
        check_train_checkpoint(start.checkpoint, start.source)
        batch = settings_of(start.checkpoint).get("global_batch_size") or config.data.global_batch_size
        check_epoch_position(start.checkpoint, start.source, per_rank // max(1, batch // world_size))
    check_space_for_checkpoint(config, start)


def checkpoint_bytes(model_config: dict) -> int:
    """About a train checkpoint's size: fp32 weights, EMA and AdamW's two moments, plus 1 MiB for the rest."""
    return 4 * 4 * ModelConfig.from_dict(model_config).parameter_count() + (1 << 20)


def check_space_for_checkpoint(config: TrainConfig, start: StartPoint) -> None:
    """NoSpaceLeft before any heavy work when the folder the checkpoints go to cannot take the next one."""
    model_config = start.checkpoint["model_config"] if start.resuming else config.model.sit_kwargs()
    folder = (experiment_dir_of(start.source) if start.resuming else None) or config.run.results_dir
    check_free_space(folder, checkpoint_bytes(model_config), "the next checkpoint (weights, EMA and AdamW state)")


def run_training(plan: TrainingPlan) -> None:
    """Join the job and train the plan; SIGTERM/SIGINT stop after a checkpoint (a normal return). Raises
    RunFailure when training diverges; a failure before the first checkpoint removes the run's folder."""
    if plan.finished is not None:
        if launched_rank() == 0:
            print(plan.finished, file=sys.stderr, flush=True)
        return
    check_start(plan, launched_world_size())
    stop = StopSignal()
    stop.install()
    ctx = setup_distributed()
    stop.connect()
    try:
        with folder_locks_released():  # the experiment folder's lock (sit.locks), held by rank 0
            train(plan.config, ctx=ctx, dataset=plan.dataset, start=plan.start, warnings=plan.warnings, stop=stop,
                  latent_statistics=plan.latent_statistics)
        if stop.stopped and ctx.is_main:  # a stop signal ended training with its checkpoint saved
            by = stop.received or "a signal to another rank"
            logging.getLogger("sit").info(f"Stopped cleanly by {by} after saving the checkpoint: every "
                                          f"process exits 0 (torchrun itself may report the signal)")
    except TrainingDiverged as error:
        logging.getLogger("sit").error(f"error: {error}")  # into log.txt before it is moved away
        removed = discard_unfinished_experiments()
        raise RunFailure(f"{error}; stopping before any checkpoint was written: {removal_note(removed[0])}"
                         if removed else f"{error}; stopping, the last good checkpoint is kept") from None
    except BaseException as error:
        logging.getLogger("sit").error(f"error: {type(error).__name__}: {error}")  # the kept log says why
        # a setup check that failed (a UsageError: e.g. a VAE that cannot load) leaves nothing, as before the folder
        removed = discard_unfinished_experiments(keep_logs=not isinstance(error, UsageError))
        if removed and isinstance(error, (RunFailure, UsageError)):
            kind = UsageError if isinstance(error, UsageError) else RunFailure
            raise kind(f"{error} (no checkpoint had been written: {removal_note(removed[0])})") from None
        raise
    else:
        discard_unfinished_experiments(keep_logs=False)  # stopped by a signal before the first step: nothing to keep
    finally:
        cleanup_distributed()


def removal_note(removed: tuple[str, Optional[str]]) -> str:
    """What happened to a failed run's folder, for its last line."""
    folder, log = removed
    return f"removed the run's folder {folder}" + (f", its log kept as {log}" if log else "")
