"""train.py's settings that would otherwise do nothing, silently: refused when the user gave them (e.g.
--loss-weight of a velocity model, FID flags without --fid-every), warned about when a checkpoint or a
default gave them; a resumed checkpoint's own setting that cannot work here; and a resume with no steps left
(exit 0 at --max-steps or --epochs, exit 2 past them).
"""
from __future__ import annotations

import os
from typing import AbstractSet, Optional

from models import has_null_class
from sit.config import Resolved
from sit.errors import UsageError
from sit.files import folder_problem
from sit.metrics.errors import MetricInputError
from sit.metrics.npz import open_npz
from sit.metrics.reference import STATISTICS_KEYS, stats_cache_path
from sit.training.settings import TrainConfig
from sit.latents import LATENT_SPACES

def check_checkpoint_settings(config: TrainConfig, resolved: Resolved, world_size: int) -> None:
    """UsageError for a resumed checkpoint's own setting that cannot work here, said as the checkpoint's."""
    batch = config.data.global_batch_size
    if resolved.origin.get("global_batch_size") == "checkpoint" and batch % world_size:
        raise UsageError(f"{resolved.describe('global_batch_size')} is not divisible by the {world_size} processes: "
                         f"pass --global-batch-size (a multiple of {world_size}; the data order then differs from "
                         f"an uninterrupted run) or run {world_size_hint(batch)} processes")
    vae = config.model.vae
    if resolved.origin.get("vae") == "checkpoint" and not (vae in LATENT_SPACES or os.path.isdir(vae)):
        raise UsageError(f"{resolved.describe('vae')} is not a folder any more: pass --vae with where that VAE is "
                         f"now (a copy of the same VAE; ema or mse share its encoder)")


def world_size_hint(batch: int) -> str:
    """Process counts that divide a global batch, for a message: e.g. "1, 2, 4 or 8"."""
    counts = [count for count in (1, 2, 4, 8, 16) if batch % count == 0]
    return ", ".join(map(str, counts[:-1])) + f" or {counts[-1]}" if len(counts) > 1 else str(counts[0])


def unused_setting_warnings(config: TrainConfig, explicit: AbstractSet[str], resuming: bool) -> list[str]:
    """Warnings for settings that the run will not apply; UsageError for such a flag given explicitly."""
    warnings = []
    transport = config.transport
    if transport.loss_weight is not None and transport.applied_loss_weight is None:
        if not resuming:
            raise UsageError(f"--loss-weight {transport.loss_weight} weights only score and noise losses; a velocity "
                             f"model's loss is never weighted (the original accepted the flag and ignored it): drop "
                             f"--loss-weight, or pass --prediction score or noise")
        warnings.append(f"the checkpoint's loss_weight {transport.loss_weight} is not applied: a velocity model's "
                        f"loss is never weighted (as in the original run that wrote it)")
    max_steps = config.optim.max_steps
    for key, every, what in (("fid_every", config.fid.fid_every, "FID is never measured"),
                             ("sample_every", config.run.sample_every, "no preview grid is made")):
        if key in explicit and max_steps is not None and every is not None and every > max_steps:
            warnings.append(f"--{key.replace('_', '-')} {every} but the run ends at --max-steps {max_steps}: {what}")
    kwargs = config.model.sit_kwargs()
    if config.run.cfg_scale > 1.0 and not has_null_class(kwargs):
        if "cfg_scale" in explicit:
            raise UsageError(f"--cfg-scale {config.run.cfg_scale} guides the preview grids, but this model has no "
                             f"null class to guide with (class_dropout_prob 0): pass --cfg-scale 1")
        warnings.append(f"the preview grids are not guided: the model has no null class (class_dropout_prob 0), "
                        f"so the default --cfg-scale {config.run.cfg_scale} does not apply")
    return warnings


def check_results_dir(config: TrainConfig, resuming: bool) -> None:
    """UsageError when a new experiment folder cannot be made in --results-dir (found before any work)."""
    problem = None if resuming else folder_problem(config.run.results_dir)
    if problem:
        raise UsageError(f"--results-dir {config.run.results_dir}: {problem}; name a folder you can write")


def check_fid_reference(config: TrainConfig) -> None:
    """With --fid-every: --fid-ref must hold mu/sigma (its keys read) and --fid-inception-weights exist."""
    fid = config.fid
    if fid.fid_every is None:
        return
    try:
        with open_npz(fid.fid_ref) as data:
            keys = set(data.files)
    except MetricInputError as error:
        raise UsageError(f"--fid-ref: {error}") from None
    if not set(STATISTICS_KEYS) <= keys:
        raise UsageError(f"--fid-ref {fid.fid_ref} holds no mu/sigma statistics; make them once with `python "
                         f"evaluate.py {fid.fid_ref}` and pass {stats_cache_path(fid.fid_ref)}")
    if fid.fid_inception_weights is not None and not os.path.isfile(fid.fid_inception_weights):
        raise UsageError(f"--fid-inception-weights {fid.fid_inception_weights}: no such file")


def nothing_left_to_do(config: TrainConfig, checkpoint: Optional[dict], source: Optional[str],
                       explicit: AbstractSet[str]) -> Optional[str]:
    """For a resumed checkpoint: None when training has steps left; a one-line "nothing to do" when it
    stands exactly at --max-steps or --epochs. UsageError when it is already past either."""
    if checkpoint is None:
        return None
    steps, epoch = checkpoint.get("train_steps", 0), checkpoint.get("epoch", 0)
    max_steps, epochs = config.optim.max_steps, config.optim.epochs
    epochs_given = f"--epochs {epochs}" + ("" if "epochs" in explicit else " (the default)")
    if max_steps is not None and steps > max_steps:
        raise UsageError(f"--max-steps {max_steps} but the checkpoint {source} is already at step {steps}: pass a "
                         f"larger --max-steps to train on (a checkpoint cannot be trained back)")
    if epoch > epochs:
        raise UsageError(f"{epochs_given} but the checkpoint {source} has already finished {epoch} epochs: pass a "
                         f"larger --epochs to train on")
    if max_steps is not None and steps == max_steps:
        return (f"nothing to do: the checkpoint {source} is already at step {steps} = --max-steps; pass a larger "
                f"--max-steps to train on")
    if epoch == epochs:
        return (f"nothing to do: the checkpoint {source} has finished {epoch} epochs = {epochs_given}; pass a "
                f"larger --epochs to train on")
    return None
