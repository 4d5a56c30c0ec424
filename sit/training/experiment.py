"""Experiment folders and where a run starts: results/<NNN>-<folder name>/ with log.txt, config.yaml,
checkpoints/<step>.pt, latest.txt (the newest checkpoint's path), samples/<step>.png, preview_labels.txt and
(with --wandb) wandb_id.txt. A run starts from scratch, from --ckpt, or from the newest checkpoint --resume
finds (one that cannot load is skipped with a warning). Rank 0 holds `<experiment>/owner.lock` (sit.locks)
while the run lives and removes the temporary files a killed run left.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

import download
from sit.checkpoint import RESUMABLE_KEYS
from sit.cli import NOT_IN_CONFIG_FILES
from sit.distributed import DistContext, on_main
from sit.errors import RunFailure, UsageError, named_by
from sit.files import atomic_text, move_file, remove_temporaries, step_files
from sit.locks import acquire_folder_lock
from sit.log import create_logger
from sit.training.settings import NEWEST, TrainConfig

EXPERIMENT_FOLDER = re.compile(r"^(\d{3,})-")
LATEST_FILE = "latest.txt"  # <experiment>/latest.txt: the path of the newest checkpoint the run wrote
CONFIG_FILE = "config.yaml"  # <experiment>/config.yaml: the run's settings, for train.py --config
FAILED_FOLDER = "failed"  # <results-dir>/failed/<experiment>.log.txt: the logs of runs that failed before a checkpoint


def experiment_checkpoints(experiment_dir: str) -> list[str]:
    """The <experiment_dir>/checkpoints/<step>.pt files, the highest step first."""
    return [path for _, path in reversed(step_files(os.path.join(experiment_dir, "checkpoints")))]


def newest_checkpoint(experiment_dir: str) -> Optional[str]:
    """The checkpoint with the highest step in <experiment_dir>/checkpoints, or None."""
    found = experiment_checkpoints(experiment_dir)
    return found[0] if found else None


def newest_experiment(results_dir: str, with_checkpoint: bool = True) -> Optional[str]:
    """The experiment folder with the highest index (with a checkpoint unless with_checkpoint is False)."""
    if not os.path.isdir(results_dir):
        return None
    found = [(int(match.group(1)), name) for name in os.listdir(results_dir)
             if (match := EXPERIMENT_FOLDER.match(name))
             and os.path.isdir(path := os.path.join(results_dir, name))
             and (not with_checkpoint or newest_checkpoint(path) is not None)]
    return os.path.join(results_dir, max(found)[1]) if found else None


def experiment_dir_of(checkpoint_path: str) -> Optional[str]:
    """<experiment> for <experiment>/checkpoints/<step>.pt, else None."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None


def checkpoint_in_folder(folder: str, flag: str = "--ckpt") -> tuple[str, str]:
    """The checkpoint a folder names and how it was picked: an experiment folder's newest, or a results
    folder's newest experiment's newest. UsageError when the folder holds neither."""
    path = newest_checkpoint(folder)
    if path is not None:
        return path, f"{flag} {folder}: its newest checkpoint, {path}"
    experiment = newest_experiment(folder)
    if experiment is None:
        raise UsageError(f"{flag} {folder}: a folder with neither checkpoints/<step>.pt nor an experiment "
                         f"folder (<NNN>-...) with one")
    path = newest_checkpoint(experiment)
    return path, f"{flag} {folder}: the newest experiment's newest checkpoint, {path}"


def checkpoint_to_start_from(ckpt: Optional[str], resume: Optional[str], results_dir: str) -> Optional[str]:
    """The file that --ckpt or --resume names (None: train from scratch); UsageError when there is none."""
    if ckpt is not None and resume is not None:
        raise UsageError("pass either --ckpt or --resume, not both")
    if ckpt is not None:
        return ckpt
    if resume is None:
        return None
    if resume == NEWEST:
        experiment, newest = newest_experiment(results_dir), newest_experiment(results_dir, with_checkpoint=False)
        if experiment is None:
            raise UsageError(f"--resume: no experiment with a checkpoint in --results-dir {results_dir}")
        if newest != experiment:  # it died before its first checkpoint: which one is meant is not clear
            raise UsageError(f"--resume: the newest experiment {newest} has no checkpoint (it stopped before its "
                             f"first); to continue the older {experiment}, name it: --resume {experiment}")
        return newest_checkpoint(experiment)
    if os.path.isfile(resume):
        return resume
    if os.path.isdir(resume):
        path = newest_checkpoint(resume)
        if path is None:
            raise UsageError(f"--resume {resume}: no checkpoints/<step>.pt in that folder")
        return path
    raise UsageError(f"--resume {resume}: no such experiment folder or checkpoint file")


@dataclass
class StartPoint:
    """Where training starts: `source` and its loaded `checkpoint` (both None: from scratch), and warnings
    about checkpoints skipped on the way. A train.py checkpoint resumes; bare weights fine-tune."""
    source: Optional[str] = None
    checkpoint: Optional[dict] = None
    warnings: list[str] = field(default_factory=list)

    @property
    def resuming(self) -> bool:
        """Whether the checkpoint can be resumed (train.py's format), rather than only fine-tuned."""
        return self.checkpoint is not None and all(key in self.checkpoint for key in RESUMABLE_KEYS)


def load_newest_loadable(experiment_dir: str) -> StartPoint:
    """The experiment's newest checkpoint that loads; newer ones that do not are skipped with a warning."""
    warnings, first_error = [], None
    for path in experiment_checkpoints(experiment_dir):
        try:
            return StartPoint(path, download.load_checkpoint(path), warnings)
        except download.CheckpointError as error:
            first_error = first_error or error
            warnings.append(f"skipped {path}: {error}; resuming from the checkpoint before it")
    raise UsageError(f"no checkpoint of {experiment_dir} can be loaded: {first_error}")


def start_checkpoint(ckpt: Optional[str], resume: Optional[str], results_dir: str) -> StartPoint:
    """Where to start for --ckpt/--resume/--results-dir. A file the user named must load; one that --resume
    picked may fall back to the one before it. Raises UsageError (CheckpointError)."""
    source = checkpoint_to_start_from(ckpt, resume, results_dir)
    if source is None:
        return StartPoint()
    if ckpt is not None or (resume != NEWEST and os.path.isfile(resume)):
        with named_by("--ckpt" if ckpt is not None else "--resume"):
            return StartPoint(source, download.load_checkpoint(source))
    return load_newest_loadable(experiment_dir_of(source))


def create_experiment_dir(results_dir: str, name: str) -> str:
    """A new <results_dir>/<NNN>-<name> folder (name: TrainConfig.folder_name)."""
    os.makedirs(results_dir, exist_ok=True)
    indices = [int(match.group(1)) for entry in os.listdir(results_dir) if (match := EXPERIMENT_FOLDER.match(entry))]
    index = max(indices, default=-1) + 1
    while True:  # another job may take an index at the same moment: take the next one
        path = os.path.join(results_dir, f"{index:03d}-{name}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            index += 1


# The experiment folders this process created (rank 0), each with --results-dir when the run created that
# too, until the run ends: a run that fails before its first checkpoint removes its own, never another's.
CREATED_FOLDERS: list[tuple[str, Optional[str]]] = []


def discard_unfinished_experiments(keep_logs: bool = True) -> list[tuple[str, Optional[str]]]:
    """Remove the experiment folders this process created that hold no checkpoint (`--resume` must not
    find them), and an emptied --results-dir it created; with keep_logs each log.txt is kept as
    <results-dir>/failed/<folder>.log.txt. Returns (folder removed, where its log was kept or None)."""
    removed = []
    while CREATED_FOLDERS:
        folder, created_parent = CREATED_FOLDERS.pop()
        if newest_checkpoint(folder) is not None:
            continue
        logger = logging.getLogger("sit")
        for handler in list(logger.handlers):  # log.txt is open inside the folder
            if isinstance(handler, logging.FileHandler) and handler.baseFilename.startswith(os.path.abspath(folder) + os.sep):
                handler.close()
                logger.removeHandler(handler)
        log, kept = os.path.join(folder, "log.txt"), None
        if keep_logs and os.path.isfile(log) and os.path.getsize(log) > 0:
            kept = os.path.join(os.path.dirname(folder), FAILED_FOLDER, os.path.basename(folder) + ".log.txt")
            with contextlib.suppress(OSError):  # a log that cannot be moved goes with the folder
                move_file(log, kept)
            kept = kept if os.path.isfile(kept) else None
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.exists(folder):
            removed.append((folder, kept))
        if created_parent is not None and os.path.isdir(created_parent) and not os.listdir(created_parent):
            with contextlib.suppress(OSError):  # only when empty: another run may start in it meanwhile
                os.rmdir(created_parent)
    return removed


def write_config_file(folder: str, settings: dict, defaults: dict) -> str:
    """<experiment>/config.yaml for `train.py --config`: the settings that differ from their defaults, then
    the defaults it ran with as comments (not --ckpt/--resume)."""
    path = os.path.join(folder, CONFIG_FILE)
    kept = {key: value for key, value in settings.items() if key not in NOT_IN_CONFIG_FILES}
    changed = {key: value for key, value in kept.items() if key not in defaults or value != defaults[key]}
    as_default = yaml.safe_dump({key: value for key, value in kept.items() if key not in changed}, sort_keys=True)
    atomic_text(path, f"# train.py --config {CONFIG_FILE}: the settings of {os.path.basename(folder)}\n"
                      + yaml.safe_dump(changed, sort_keys=True) + "# and the defaults it ran with:\n"
                      + "".join(f"# {line}\n" for line in as_default.splitlines()), suffix=".yaml")
    return path


def write_latest(experiment_dir: str, checkpoint_path: str) -> str:
    """Point <experiment>/latest.txt at the checkpoint just written (its absolute path and a newline),
    atomically; returns latest.txt's path."""
    path = os.path.join(experiment_dir, LATEST_FILE)
    atomic_text(path, os.path.abspath(checkpoint_path) + "\n")
    return path


def wandb_run_id(experiment_dir: str, stored_id: Optional[str]) -> str:
    """The experiment's wandb run id: wandb_id.txt's (or the checkpoint's), else a new one, stored."""
    path = os.path.join(experiment_dir, "wandb_id.txt")
    if os.path.isfile(path):
        with open(path) as handle:
            return handle.read().strip()
    run_id = stored_id or secrets.token_hex(8)
    atomic_text(path, run_id + "\n")
    return run_id


def init_wandb(settings: dict, experiment_dir: str, stored_id: Optional[str]) -> Any:
    """Start (or continue) the experiment's wandb run; env is read only here (only with --wandb)."""
    import wandb

    run_id = wandb_run_id(experiment_dir, stored_id)
    try:
        if os.environ.get("WANDB_KEY"):
            wandb.login(key=os.environ["WANDB_KEY"])
        return wandb.init(id=run_id, resume="allow", entity=os.environ.get("ENTITY"),
                          project=os.environ.get("PROJECT", "SiT"), name=os.path.basename(experiment_dir),
                          config=settings, dir=experiment_dir)
    except Exception as error:  # login, network or configuration: one line for the user
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise UsageError(f"wandb could not start ({type(error).__name__}: {first_line}); "
                         f"set WANDB_KEY, or WANDB_MODE=offline, or drop --wandb") from None


@dataclass
class Experiment:
    """Where a run writes: its folder (rank 0 only; None elsewhere), logger (silent off rank 0), wandb run."""
    folder: Optional[str]
    logger: logging.Logger
    wandb_run: Any = None


def open_experiment(ctx: DistContext, config: TrainConfig, start: StartPoint) -> Experiment:
    """Rank 0: a new experiment folder (or a resumed checkpoint's), its log.txt (first line: the
    configuration) and wandb; every rank stops if rank 0 could not set up."""
    settings = config.settings()

    def set_up() -> Experiment:
        same_folder = experiment_dir_of(start.source) if start.resuming else None
        try:
            new_results_dir = None if same_folder or os.path.isdir(config.run.results_dir) else config.run.results_dir
            folder = same_folder or create_experiment_dir(config.run.results_dir, config.folder_name())
            if not same_folder:
                CREATED_FOLDERS.append((folder, new_results_dir))
            os.makedirs(os.path.join(folder, "checkpoints"), exist_ok=True)
            notes: list[str] = []
            # one writer: a UsageError while another run lives
            acquire_folder_lock(folder, "the experiment folder", warn=notes.append)
            removed = sum(remove_temporaries(os.path.join(folder, sub), "") for sub in ("checkpoints", "samples", "."))
            logger = create_logger(folder, is_main=True)
            logger.info(f"Configuration: {json.dumps(dict(settings, world_size=ctx.world_size), sort_keys=True)}")
            logger.info(f"Experiment directory: {folder}")
            write_config_file(folder, settings, TrainConfig.defaults())
            for note in notes + ([f"removed {removed} unfinished files a killed run left"] if removed else []):
                logger.warning(note)
            wandb_run = None
            if config.run.wandb:
                # A checkpoint resumed outside its folder starts a new experiment, hence a new wandb run.
                wandb_run = init_wandb(settings, folder, start.checkpoint.get("wandb_id") if same_folder else None)
                logger.info(f"wandb run id: {wandb_run.id}")
        except OSError as error:  # e.g. a read-only or full results folder
            raise RunFailure(f"cannot write the experiment folder ({error})") from error
        return Experiment(folder, logger, wandb_run)

    experiment = on_main(ctx, set_up)
    return experiment if ctx.is_main else Experiment(None, create_logger(None, is_main=False))
