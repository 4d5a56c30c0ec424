"""Train SiT with PyTorch DDP: one process (`python train.py ...`), one machine or many (torchrun).

    torchrun --nnodes=1 --nproc_per_node=N train.py --model SiT-XL/2 --data-path /path/to/imagenet/train

Each run writes to results/<NNN>-<model>-<path>-<prediction>-<loss weight>/: log.txt, checkpoints/
<step>.pt, samples/<step>.png and (with --wandb) wandb_id.txt. A checkpoint holds everything needed
to continue exactly: model, EMA, optimizer, step, epoch, position in the epoch and every rank's RNG.

Resume (continues in the same experiment folder; losses equal those of an uninterrupted run):
    --resume                          the newest checkpoint of the newest experiment in --results-dir
    --resume results/003-SiT-XL-2-... the newest checkpoint of that experiment
    --ckpt results/003-.../checkpoints/0050000.pt   that checkpoint
Model and transport settings then come from the checkpoint (asking for different ones is an error);
the command line keeps run length, logging, checkpoint/sample intervals, workers and --wandb.
--lr and --ema-decay are the checkpoint's unless given again: a new value applies from the resumed
step on (e.g. to lower the learning rate late in a run), with a warning that the run then differs
from an uninterrupted one. --vae is the checkpoint's unless given: another path (a moved copy of the
same VAE) is allowed with a warning; switching between pixels (--vae none) and latents is not.
--resume skips a newest checkpoint that cannot be loaded (truncated) with a warning, for the one before.
`--ckpt` with bare weights (a published model, or a checkpoint without optimizer state) fine-tunes
them in a new experiment from step 0. SIGTERM/SIGINT: finish the step, save a checkpoint, exit 0.

Pixel space (`--vae none`): the model learns images in [-1, 1] directly (3 channels, input size =
image size, any size the patch size divides), e.g. the 8x8 digits of the README's CPU quick start.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import secrets
import signal
import sys
from copy import deepcopy
from dataclasses import dataclass
from time import time
from typing import Any, NoReturn, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import download
from features import LatentFeatureDataset
from models import MODEL_SHAPES, SiT, SiT_models, has_null_class, model_config_from_state_dict, model_name_for_config
from sampling import decode_latents, guided_sample, noise_and_labels
from train_utils import (LATENT_SCALE, VAE_REPOS, ResumableDistributedSampler, TrainImageFolder, add_speed_arguments,
                         all_ranks_ok, all_reduce_mean, atomic_torch_save, atomic_write, autocast, cleanup_distributed, compile_model,
                         configure_precision, create_logger, gather_rng_states, load_vae, make_grad_scaler,
                         make_optimizer, non_negative_int, parse_transport_args, positive_int, restore_rng_state,
                         setup_distributed, transport_from_args, update_ema)
from transport import Sampler, Transport

NEWEST = "newest"  # `--resume` with no value
CHECKPOINT_FILE = re.compile(r"^(\d{7,})\.pt$")
EXPERIMENT_FOLDER = re.compile(r"^(\d{3,})-")
# What the model is and what it learns: on resume these come from the checkpoint.
CHECKPOINT_SETTINGS = ("model", "model_config", "image_size", "num_classes", "path_type", "prediction",
                       "loss_weight", "train_eps", "sample_eps")
# The VAE: the checkpoint's unless given; another one (a moved copy, or mse for ema: they share the
# encoder) is allowed with a warning, but not switching between pixel space and latents.
VAE_SETTING = "vae"
# What decides the data order: from the checkpoint unless given (then the run is no exact continuation).
DATA_ORDER_SETTINGS = ("global_batch_size", "global_seed", "random_flip")
# Optimisation settings: from the checkpoint unless given (then the new value applies from the resumed step).
RUN_SETTINGS = ("lr", "ema_decay")
PIXEL_SPACE = "none"  # --vae none: no VAE, the model sees pixels
MODEL_CONFIG_KEYS = ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "class_dropout_prob", "learn_sigma")
EMA_DECAY = 0.9999  # default of --ema-decay (the paper's)
PREVIEW_IMAGES = 16  # EMA samples per preview grid (4 x 4)
PREVIEW_STEPS = 50   # fixed-step Euler ODE: bounded time and memory (the original ran dopri5, issue #11)


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite."""


@dataclass
class TrainState:
    """Where training stands: steps done in all, the current epoch and batches done in it."""
    train_steps: int = 0
    epoch: int = 0
    epoch_step: int = 0


def fail(message: str) -> NoReturn:
    """End with a one-line message (printed once: by rank 0, or by the single process)."""
    if os.environ.get("RANK", "0") == "0":
        raise SystemExit(f"train.py: error: {message}")
    raise SystemExit(1)


#################################################################################
#                                 Command line                                  #
#################################################################################

def positive_float(value: str) -> float:
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def decay_rate(value: str) -> float:
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    # Default args train SiT-XL/2 with the paper's hyperparameters (except the number of steps).
    parser = argparse.ArgumentParser(description="Train SiT (see the module docstring for resuming).",
                                     allow_abbrev=False)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-path", type=str, default=None, help="an ImageFolder: <root>/<class>/<image>")
    data.add_argument("--feature-path", type=str, default=None,
                        help="instead of --data-path: latents cached by extract_features.py; no VAE is loaded "
                             "(--vae then only decodes the preview grids, loaded on rank 0 at the first one)")
    parser.add_argument("--results-dir", type=str, default="results")
    parser.add_argument("--model", type=str, choices=list(SiT_models), default="SiT-XL/2")
    parser.add_argument("--model-config", type=str, default=None,
                        help="JSON overriding the --model shape, for tests and experiments, e.g. "
                             "'{\"depth\": 1, \"hidden_size\": 32, \"num_heads\": 2}'; keys: " + ", ".join(MODEL_CONFIG_KEYS))
    parser.add_argument("--image-size", type=positive_int, default=256,
                        help="a multiple of 8 (256 or 512 in the paper); with --vae none any size the patch size divides")
    parser.add_argument("--num-classes", type=positive_int, default=1000)
    parser.add_argument("--epochs", type=positive_int, default=1400)
    parser.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps in all")
    parser.add_argument("--global-batch-size", type=positive_int, default=256)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=True,
                        help="flip training images horizontally at random (the paper's); --no-random-flip for "
                             "data that flipping changes, such as digits")
    parser.add_argument("--vae", type=str, default="ema",
                        help="ema, mse or a local diffusers AutoencoderKL folder (the choice hardly affects training); "
                             "none: train on pixels in [-1, 1] without a VAE")
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate (constant)")
    parser.add_argument("--ema-decay", type=decay_rate, default=EMA_DECAY, help="decay of the EMA weights per step")
    parser.add_argument("--num-workers", type=non_negative_int, default=4)
    parser.add_argument("--log-every", type=positive_int, default=100)
    parser.add_argument("--ckpt-every", type=positive_int, default=50_000)
    parser.add_argument("--sample-every", type=positive_int, default=10_000)
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="guidance of the preview samples")
    parser.add_argument("--wandb", action="store_true",
                        help="log to Weights & Biases (env: WANDB_KEY optional, ENTITY, PROJECT)")
    parser.add_argument("--ckpt", type=str, default=None,
                        help="a train.py checkpoint to resume, or weights (path, URL, published name) to fine-tune")
    parser.add_argument("--resume", type=str, nargs="?", const=NEWEST, default=None,
                        help="resume an experiment folder's newest checkpoint; alone: the newest experiment in --results-dir")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute each block in the backward pass: less memory, about a third more compute")
    parser.add_argument("--max-grad-norm", type=positive_float, default=None,
                        help="clip the gradient norm to this (default: no clipping); the norm is logged")
    fid = parser.add_argument_group("FID while training (evaluate.py's definitions)")
    fid.add_argument("--fid-every", type=positive_int, default=None, help="measure FID every N steps (default: never)")
    fid.add_argument("--fid-num-samples", type=positive_int, default=10_000, help="EMA samples per measurement, over all ranks")
    fid.add_argument("--fid-ref", type=str, default=None,
                     help="reference statistics: an ADM reference batch with mu/sigma, or the .stats.npz evaluate.py caches")
    fid.add_argument("--fid-steps", type=positive_int, default=50, help="Euler ODE steps of the FID samples")
    fid.add_argument("--fid-cfg-scale", type=float, default=1.0, help="guidance of the FID samples")
    fid.add_argument("--fid-inception-weights", type=str, default=None,
                     help="a local Inception weights file (default: downloaded once by torch-fidelity)")
    add_speed_arguments(parser)
    parse_transport_args(parser)
    return parser


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, set[str]]:
    """The arguments, and which of the checkpoint-owned settings the command line gave explicitly."""
    args = build_parser().parse_args(argv)
    if args.vae not in VAE_REPOS and args.vae != PIXEL_SPACE and os.path.isdir(args.vae):
        args.vae = os.path.abspath(args.vae)  # checkpoints name the VAE folder wherever the run starts
    owned = CHECKPOINT_SETTINGS + (VAE_SETTING,) + DATA_ORDER_SETTINGS + RUN_SETTINGS
    not_given = object()  # a default no command line can produce (and not a string: argparse would convert it)
    explicit_parser = build_parser()
    explicit_parser.set_defaults(**{key: not_given for key in owned})
    given = vars(explicit_parser.parse_args(argv))
    return args, {key for key in owned if given[key] is not not_given}


def launched_world_size() -> int:
    """The number of processes torchrun started (1 for a plain `python train.py`)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return 1


def model_overrides(args: argparse.Namespace) -> dict:
    """The --model-config JSON as a dict of SiT arguments."""
    if args.model_config is None:
        return {}
    try:
        overrides = json.loads(args.model_config)
    except json.JSONDecodeError as error:
        fail(f"--model-config is not valid JSON ({error})")
    if not isinstance(overrides, dict):
        fail("--model-config must be a JSON object, e.g. '{\"depth\": 2}'")
    unknown = sorted(set(overrides) - set(MODEL_CONFIG_KEYS))
    if unknown:
        fail(f"--model-config: unknown key(s) {', '.join(unknown)}; valid: {', '.join(MODEL_CONFIG_KEYS)}")
    return overrides


def model_config_for_args(args: argparse.Namespace) -> dict:
    """SiT constructor arguments for --model, --model-config, --image-size and --num-classes."""
    depth, hidden_size, patch_size, num_heads = MODEL_SHAPES[args.model]
    if args.vae == PIXEL_SPACE:
        shape = dict(input_size=args.image_size, in_channels=3)  # (3, H, W) pixels
    else:
        shape = dict(input_size=args.image_size // 8, in_channels=4)  # (4, H/8, W/8) SD-VAE latents
    config = dict(**shape, patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                  num_classes=args.num_classes)
    config.update(model_overrides(args))
    return config


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """One-line errors for settings that cannot work, before any heavy work."""
    pixel_space = args.vae == PIXEL_SPACE
    if args.feature_path is not None and pixel_space:
        fail("--feature-path holds VAE latents; --vae none trains on pixels: use --data-path with --vae none")
    if args.image_size % 8 and not pixel_space:
        fail(f"--image-size must be a multiple of 8 (the VAE downsamples by 8), got {args.image_size}")
    if args.global_batch_size % world_size:
        fail(f"--global-batch-size {args.global_batch_size} is not divisible by the {world_size} processes")
    if args.ckpt is not None and args.resume is not None:
        fail("pass either --ckpt or --resume, not both")
    if args.vae not in VAE_REPOS and not pixel_space and not os.path.isdir(args.vae):
        fail(f"--vae {args.vae!r} is neither one of {', '.join(VAE_REPOS)}, {PIXEL_SPACE} nor a local diffusers folder")
    config = model_config_for_args(args)
    if config["input_size"] % config["patch_size"]:
        what = "pixels" if pixel_space else "latents"
        fail(f"--image-size {args.image_size} gives {config['input_size']}x{config['input_size']} {what}, "
             f"not divisible by the patch size {config['patch_size']}")
    if config["hidden_size"] % config["num_heads"]:
        fail(f"hidden size {config['hidden_size']} is not divisible by {config['num_heads']} heads")
    try:
        transport_from_args(args)
    except ValueError as error:
        fail(str(error))
    if args.fid_every is not None and (args.fid_ref is None or not os.path.isfile(args.fid_ref)):
        fail(f"--fid-every needs --fid-ref, a file of reference statistics (got {args.fid_ref!r}); "
             f"make one with `python evaluate.py VIRTUAL_imagenet256_labeled.npz`")
    if args.fid_cfg_scale < 1.0:
        fail(f"--fid-cfg-scale must be >= 1, got {args.fid_cfg_scale}")
    if args.fid_every is not None and args.fid_cfg_scale > 1.0 and not has_null_class(config):
        fail(f"--fid-cfg-scale {args.fid_cfg_scale} needs a model with label dropout (its null class), but "
             f"class_dropout_prob is 0: use --fid-cfg-scale 1")


#################################################################################
#                          Checkpoints: find, load, adopt                       #
#################################################################################

def experiment_checkpoints(experiment_dir: str) -> list[str]:
    """The <experiment_dir>/checkpoints/<step>.pt files, the highest step first."""
    folder = os.path.join(experiment_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    steps = [(int(match.group(1)), name) for name in os.listdir(folder) if (match := CHECKPOINT_FILE.match(name))]
    return [os.path.join(folder, name) for _, name in sorted(steps, reverse=True)]


def newest_checkpoint(experiment_dir: str) -> Optional[str]:
    """The checkpoint with the highest step in <experiment_dir>/checkpoints, or None."""
    found = experiment_checkpoints(experiment_dir)
    return found[0] if found else None


def newest_experiment(results_dir: str) -> Optional[str]:
    """The experiment folder with the highest index that has a checkpoint, or None."""
    if not os.path.isdir(results_dir):
        return None
    found = []
    for name in os.listdir(results_dir):
        match = EXPERIMENT_FOLDER.match(name)
        path = os.path.join(results_dir, name)
        if match and newest_checkpoint(path) is not None:
            found.append((int(match.group(1)), name))
    return os.path.join(results_dir, max(found)[1]) if found else None


def checkpoint_to_start_from(args: argparse.Namespace) -> Optional[str]:
    """The file that --resume or --ckpt names (None: train from scratch)."""
    if args.ckpt is not None:
        return args.ckpt
    if args.resume is None:
        return None
    if args.resume == NEWEST:
        experiment = newest_experiment(args.results_dir)
        if experiment is None:
            fail(f"--resume: no experiment with a checkpoint in --results-dir {args.results_dir}")
        return newest_checkpoint(experiment)
    if os.path.isfile(args.resume):
        return args.resume
    if os.path.isdir(args.resume):
        path = newest_checkpoint(args.resume)
        if path is None:
            fail(f"--resume {args.resume}: no checkpoints/<step>.pt in that folder")
        return path
    fail(f"--resume {args.resume}: no such experiment folder or checkpoint file")


def is_train_checkpoint(checkpoint: dict) -> bool:
    """Whether a checkpoint can be resumed (train.py's format), rather than only fine-tuned."""
    return all(key in checkpoint for key in ("model", "ema", "opt", "args", "model_config", "train_steps"))


def load_start_checkpoint(path: str) -> dict:
    """The checkpoint at path, or a one-line error."""
    try:
        return download.load_checkpoint(path)
    except download.CheckpointError as error:
        fail(str(error))


def load_newest_loadable(experiment_dir: str) -> tuple[str, dict, list[str]]:
    """(path, checkpoint, warnings): the experiment's newest checkpoint that loads; each newer one
    that does not (e.g. truncated by a crash while copying) is skipped with a warning naming it."""
    warnings, first_error = [], None
    for path in experiment_checkpoints(experiment_dir):
        try:
            return path, download.load_checkpoint(path), warnings
        except download.CheckpointError as error:
            first_error = first_error or error
            warnings.append(f"skipped {path}: {error}; resuming from the checkpoint before it")
    fail(f"no checkpoint of {experiment_dir} can be loaded: {first_error}")


def start_checkpoint(args: argparse.Namespace) -> tuple[Optional[str], Optional[dict], list[str]]:
    """(path, checkpoint, warnings) to start from, or (None, None, []) to train from scratch. A file
    the user named must load; one that --resume picked may fall back to the one before it."""
    source = checkpoint_to_start_from(args)
    if source is None:
        return None, None, []
    named = args.ckpt is not None or (args.resume != NEWEST and os.path.isfile(args.resume))
    if named:
        return source, load_start_checkpoint(source), []
    return load_newest_loadable(experiment_dir_of(source))


def experiment_dir_of(checkpoint_path: str) -> Optional[str]:
    """<experiment> for <experiment>/checkpoints/<step>.pt, else None."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    if os.path.basename(folder) != "checkpoints":
        return None
    return os.path.dirname(folder)


def adopt_checkpoint_vae(args: argparse.Namespace, explicit: set[str], stored: dict, path: str) -> list[str]:
    """--vae on resume: the checkpoint's unless given. Another VAE (a moved or local copy of the same
    one, or ema for mse: they share the encoder) is allowed with a warning; pixel space against
    latents is an error. Returns the warnings."""
    if VAE_SETTING not in stored:
        return []
    given, held = args.vae, stored[VAE_SETTING]
    if VAE_SETTING not in explicit or given == held:
        args.vae = held
        return []
    if (given == PIXEL_SPACE) != (held == PIXEL_SPACE):
        fail(f"--vae {given} but the checkpoint {path} was trained with --vae {held}; a model learns either pixels "
             f"(--vae none) or VAE latents: drop the flag or start a new experiment")
    return [f"--vae {given} replaces the checkpoint's {held}: fine for a copy of the same VAE (or ema/mse, which "
            f"share the encoder); another encoder changes what the model learns"]


def adopt_checkpoint_settings(args: argparse.Namespace, explicit: set[str], checkpoint: dict, path: str) -> list[str]:
    """Take the model, transport, VAE and data-order settings from a train checkpoint's args.

    An explicit flag contradicting a model or transport setting is an error. Returns warnings for
    explicit data-order settings that differ (allowed, but no exact continuation then).
    """
    stored = vars(checkpoint["args"])
    for key in CHECKPOINT_SETTINGS:
        if key not in stored:
            continue
        given, held = getattr(args, key), stored[key]
        if key == "model_config":
            differs = (json.loads(given) if given else {}) != (json.loads(held) if held else {})
        else:
            differs = given != held
        if key in explicit and differs:
            flag = "--" + key.replace("_", "-")
            fail(f"{flag} {given} but the checkpoint {path} was trained with {flag} {held}; "
                 f"drop the flag (model and transport settings come from the checkpoint) or start a new experiment")
        setattr(args, key, held)
    warnings = adopt_checkpoint_vae(args, explicit, stored, path)
    for key in DATA_ORDER_SETTINGS:
        if key in explicit and getattr(args, key) != stored.get(key, getattr(args, key)):
            flag = "--" + key.replace("_", "-")
            warnings.append(f"{flag} {getattr(args, key)} differs from the checkpoint's {stored[key]}: "
                            f"the data order will not match an uninterrupted run")
        elif key in stored:
            setattr(args, key, stored[key])
    for key in RUN_SETTINGS:  # absent from older checkpoints: those trained with the defaults
        if key in explicit and key in stored and getattr(args, key) != stored[key]:
            flag = "--" + key.replace("_", "-")
            warnings.append(f"{flag} {getattr(args, key)} replaces the checkpoint's {stored[key]} from step "
                            f"{checkpoint['train_steps']} on: the run will differ from an uninterrupted one")
        elif key in stored:
            setattr(args, key, stored[key])
    return warnings


#################################################################################
#                                 Experiment setup                              #
#################################################################################

def create_experiment_dir(args: argparse.Namespace) -> str:
    """A new results/<NNN>-<model>-<path>-<prediction>-<loss weight> folder (the original's name)."""
    os.makedirs(args.results_dir, exist_ok=True)
    indices = [int(match.group(1)) for name in os.listdir(args.results_dir) if (match := EXPERIMENT_FOLDER.match(name))]
    index = max(indices, default=-1) + 1
    model_name = args.model.replace("/", "-")
    while True:  # another job may take an index at the same moment: take the next one
        path = os.path.join(args.results_dir, f"{index:03d}-{model_name}-{args.path_type}-{args.prediction}-{args.loss_weight}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            index += 1


def wandb_run_id(experiment_dir: str, stored_id: Optional[str]) -> str:
    """The experiment's wandb run id: from wandb_id.txt (or the checkpoint), else a new random one.

    Stored in the experiment folder, so a resumed run continues its wandb run and a new
    experiment never joins an old one."""
    path = os.path.join(experiment_dir, "wandb_id.txt")
    if os.path.isfile(path):
        with open(path) as handle:
            return handle.read().strip()
    run_id = stored_id or secrets.token_hex(8)
    tmp_path = path + ".tmp"
    with open(tmp_path, "w") as handle:
        handle.write(run_id + "\n")
    os.replace(tmp_path, path)
    return run_id


def init_wandb(args: argparse.Namespace, experiment_dir: str, stored_id: Optional[str]) -> Any:
    """Start (or continue) the experiment's wandb run; env is read only here (only with --wandb)."""
    import wandb

    run_id = wandb_run_id(experiment_dir, stored_id)
    try:
        if os.environ.get("WANDB_KEY"):
            wandb.login(key=os.environ["WANDB_KEY"])
        return wandb.init(id=run_id, resume="allow", entity=os.environ.get("ENTITY"),
                          project=os.environ.get("PROJECT", "SiT"), name=os.path.basename(experiment_dir),
                          config=vars(args), dir=experiment_dir)
    except Exception as error:  # login, network or configuration: one line for the user
        fail(f"wandb could not start ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
             f"set WANDB_KEY, or WANDB_MODE=offline, or drop --wandb")


class StopSignal:
    """SIGTERM/SIGINT set a flag: the current step finishes, a checkpoint is saved, exit 0.

    A second signal ends at once. All ranks agree on stopping through an all_reduce on a Gloo
    group, which needs no GPU synchronisation.
    """

    def __init__(self):
        self.received: Optional[str] = None
        self.group = None

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.received = signal.Signals(signum).name

    def connect(self) -> None:
        """Create the Gloo group used to agree (all ranks must call this)."""
        if dist.is_available() and dist.is_initialized():
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def agreed(self) -> bool:
        """Whether any rank received a stop signal (a collective in a distributed job)."""
        if self.group is None:
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


#################################################################################
#                            Model, data and previews                           #
#################################################################################

def build_model(args: argparse.Namespace, checkpoint: Optional[dict], resuming: bool, source: Optional[str]) -> SiT:
    """The SiT to train: the checkpoint's config and weights when resuming, bare weights loaded
    for fine-tuning, else freshly initialised (on the CPU)."""
    config = dict(checkpoint["model_config"]) if resuming else model_config_for_args(args)
    try:
        model = SiT(**config)
    except (ValueError, AssertionError, TypeError) as error:
        fail(f"cannot build the model {config}: {error}")
    if checkpoint is None:
        return model
    weights = checkpoint["model"] if "model" in checkpoint else download.state_dict_of(checkpoint)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError:
        fail(f"the weights in {source} do not fit {args.model} at --image-size {args.image_size} with "
             f"--num-classes {args.num_classes}; they are {describe_weights(weights)}")
    return model


def describe_weights(weights: dict) -> str:
    """What a state dict's shapes say it is, for error messages."""
    try:
        config = model_config_from_state_dict(weights)
    except (ValueError, KeyError):
        return "not SiT weights"
    name = model_name_for_config(config) or f"a custom SiT (depth {config['depth']}, width {config['hidden_size']})"
    downsampling = 1 if config["in_channels"] == 3 else 8  # pixels, or SD-VAE latents
    return f"{name} at image size {config['input_size'] * downsampling} with {config['num_classes']} classes"


def build_loader(args: argparse.Namespace, dataset: TrainImageFolder, rank: int, world_size: int,
                 seed: int) -> tuple[DataLoader, ResumableDistributedSampler]:
    # (epoch, index) items: flips follow the epoch even in persistent workers, which never see set_epoch
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=args.global_seed, with_epoch=True)
    local_batch_size = args.global_batch_size // world_size
    if sampler.num_samples < local_batch_size:
        fail(f"the dataset has {len(dataset)} images, fewer than one global batch of {args.global_batch_size}")
    loader = DataLoader(
        dataset, batch_size=local_batch_size, shuffle=False, sampler=sampler, num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(), drop_last=True, worker_init_fn=ignore_stop_signals,
        persistent_workers=args.num_workers > 0,  # workers live across epochs (items carry their epoch)
        # The loader's own generator: starting an iterator must not draw from the training RNG,
        # or a resumed run (which starts one mid-epoch) would drift from an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def preview_inputs(args: argparse.Namespace, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed noise (N, C, L, L) and labels (N,) for the preview grids, from their own generator."""
    generator = torch.Generator().manual_seed(args.global_seed)
    latent_size = config["input_size"]
    z = torch.randn(PREVIEW_IMAGES, config["in_channels"], latent_size, latent_size, generator=generator)
    y = torch.randint(0, config["num_classes"], (PREVIEW_IMAGES,), generator=generator)
    return z, y


@torch.no_grad()
def save_preview(ema: SiT, vae: Any, transport: Transport, inputs: tuple[torch.Tensor, torch.Tensor],
                 cfg_scale: float, path: str, device: torch.device) -> None:
    """Sample the EMA model with a fixed-step Euler ODE (no trajectory kept), decode (vae None: pixels), save a grid PNG."""
    from torchvision.utils import save_image

    z, y = (tensor.to(device) for tensor in inputs)
    sample_fn = Sampler(transport).sample_ode(sampling_method="euler", num_steps=PREVIEW_STEPS, keep_trajectory=False)
    use_cfg = cfg_scale > 1.0 and has_null_class(ema.config)
    latents = guided_sample(sample_fn, ema, z, y, cfg_scale if use_cfg else 1.0)
    images = decode_latents(vae, latents)                                  # (N, 3, H, W) in about [-1, 1]
    grid = functools.partial(save_image, images.float().cpu(), nrow=int(math.sqrt(len(images))), normalize=True,
                             value_range=(-1, 1), format="png")
    atomic_write(path, grid, suffix=".png")


#################################################################################
#                               Loss and health                                 #
#################################################################################

class LossMonitor:
    """Per-step losses kept on the device (no host sync per step), reduced over ranks when logged."""

    def __init__(self, first_step: int):
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []  # with --max-grad-norm: the norms before clipping
        self.first_step = first_step  # the step of losses[0]
        self.start_time = time()

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
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise TrainingDiverged(f"the loss became non-finite ({value}) at step {self.first_step + offset}")

    def flush(self, next_step: int) -> tuple[float, float]:
        """(mean loss, steps/s) since the last flush, after checking that every loss is finite."""
        values = self.reduced()
        self.check(values)
        steps_per_sec = len(values) / max(time() - self.start_time, 1e-9)
        self.losses, self.first_step, self.start_time = [], next_step, time()
        return sum(values) / max(len(values), 1), steps_per_sec


def log_progress(monitor: LossMonitor, step: int, global_batch_size: int, logger: Any, wandb_run: Any) -> None:
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
    if not finite.item():  # weights are identical on all ranks (DDP), so all ranks agree
        raise TrainingDiverged(f"the weights became non-finite by step {step}")


#################################################################################
#                                  Training                                     #
#################################################################################

@dataclass
class Run:
    """Everything the training loop works with."""
    args: argparse.Namespace
    ctx: Any                      # train_utils.DistContext
    model: SiT                    # the raw model (what checkpoints hold)
    ddp_model: torch.nn.Module    # the model wrapped in DDP (or the model itself in a single process)
    ema: SiT
    opt: torch.optim.Optimizer
    vae: Any
    transport: Transport
    dataset: TrainImageFolder
    loader: DataLoader
    sampler: ResumableDistributedSampler
    state: TrainState
    logger: logging.Logger
    experiment_dir: Optional[str]  # rank 0 only
    wandb_run: Any
    stop: StopSignal
    preview: tuple[torch.Tensor, torch.Tensor]  # fixed noise and labels of the sample grids
    monitor: LossMonitor
    last_saved_step: Optional[int] = None
    scaler: Optional[torch.amp.GradScaler] = None  # fp16 loss scaling (a pass-through otherwise)
    preview_vae_failed: bool = False  # --feature-path: the preview VAE could not be loaded
    fid_decoder_ready: bool = False  # --feature-path: every rank holds the VAE (since the first FID)
    fid_monitor: Any = None  # evaluate.FIDMonitor with --fid-every


def stop_unless_written(run: Run, what: str, path: Optional[str], error: Optional[Exception]) -> None:
    """After rank 0 wrote (or failed to write) a file: every rank learns the outcome (a collective, which
    also holds the others until rank 0 is done) and, on failure, stops with one line naming the file."""
    if all_ranks_ok(error is None, run.ctx.device):
        return
    message = f"cannot write the {what} {path} ({error})"
    run.logger.error(message)  # rank 0's log.txt; silent elsewhere
    fail(message)


def checkpoint_contents(run: Run, rng: list[dict]) -> dict:
    """What <step>.pt holds: everything an exact resume needs."""
    state = run.state
    return {
        "model": run.model.state_dict(), "ema": run.ema.state_dict(), "opt": run.opt.state_dict(),
        "args": run.args, "train_steps": state.train_steps, "epoch": state.epoch, "epoch_step": state.epoch_step,
        "rng": rng, "model_config": dict(run.model.config), "experiment_dir": run.experiment_dir,
        "scaler": run.scaler.state_dict() if run.scaler is not None else {},
        "wandb_id": run.wandb_run.id if run.wandb_run is not None else None,
    }


def save_checkpoint(run: Run) -> None:
    """Check health, gather every rank's RNG state, then rank 0 writes <step>.pt atomically (all ranks
    call this); if rank 0 cannot write it (disk full, permissions), every rank stops with one line."""
    state = run.state
    check_health(run.model, run.monitor, state.train_steps)
    rng = gather_rng_states(run.ctx.device)
    path, error = None, None
    if run.ctx.is_main:
        path = os.path.join(run.experiment_dir, "checkpoints", f"{state.train_steps:07d}.pt")
        try:
            atomic_torch_save(checkpoint_contents(run, rng), path)
            run.logger.info(f"Saved checkpoint to {path}")
        except (OSError, RuntimeError) as caught:  # torch.save reports a full disk as a RuntimeError
            error = caught
    stop_unless_written(run, "checkpoint", path, error)
    run.last_saved_step = state.train_steps


def save_samples(run: Run) -> None:
    """An EMA preview grid at samples/<step>.png (and to wandb), made by rank 0; every rank calls this
    and stops with one line if rank 0 cannot write the grid."""
    path, error = None, None
    if run.ctx.is_main:
        path = os.path.join(run.experiment_dir, "samples", f"{run.state.train_steps:07d}.png")
        try:
            write_preview(run, path)
        except OSError as caught:
            error = caught
    stop_unless_written(run, "preview grid", path, error)


def write_preview(run: Run, path: str) -> None:
    """Rank 0: sample, decode and save the preview grid at path (--feature-path: the VAE is loaded
    at the first one, on rank 0 only; without one, a warning and no grids)."""
    if run.args.feature_path is not None and run.vae is None:
        if run.preview_vae_failed:
            return
        try:  # loaded only now, on rank 0 only: a run with no preview never holds a VAE
            run.vae = load_vae(run.args.vae, run.ctx.device)
        except SystemExit as error:
            run.preview_vae_failed = True
            run.logger.warning(f"warning: no preview grids: {error}")
            return
    save_preview(run.ema, run.vae, run.transport, run.preview, run.args.cfg_scale, path, run.ctx.device)
    run.logger.info(f"Saved EMA samples to {path}")
    if run.wandb_run is not None:
        import wandb

        run.wandb_run.log({"samples": wandb.Image(path)}, step=run.state.train_steps)


def decoder_for_fid(run: Run) -> Any:
    """The VAE that turns FID samples into images: the training one, or (--feature-path) one that
    every rank loads at the first measurement. None for pixel-space models.

    With --feature-path, rank 0 may already hold the preview VAE: it keeps it but still joins the
    load check, so that every rank takes part in the same collectives."""
    if run.args.vae == PIXEL_SPACE or run.args.feature_path is None:
        return run.vae
    if not run.fid_decoder_ready:
        run.vae = load_vae_on_all_ranks(run.args.vae, run.ctx.device, loaded=run.vae)
        run.fid_decoder_ready = True
    return run.vae


@torch.no_grad()
def measure_fid(run: Run) -> float:
    """FID of --fid-num-samples EMA samples (all ranks take part; the same value on every rank).

    Each image's noise and label come from its own generator (sampling.noise_and_labels with
    --global-seed), so the training RNG is untouched and `sample_ddp.py ODE --sampling-method euler
    --num-sampling-steps <fid-steps> --cfg-scale <fid-cfg-scale>` on the checkpoint of the same step
    draws the same images. Only one batch of images exists at a time.
    """
    args, ctx, config = run.args, run.ctx, run.ema.config
    vae = decoder_for_fid(run)
    sample_fn = Sampler(run.transport).sample_ode(sampling_method="euler", num_steps=args.fid_steps, keep_trajectory=False)
    batch_size = args.global_batch_size // ctx.world_size
    indices = range(ctx.rank, args.fid_num_samples, ctx.world_size)
    latent_shape = (config["in_channels"], config["input_size"], config["input_size"])
    for start in range(0, len(indices), batch_size):
        z, y = noise_and_labels(indices[start:start + batch_size], args.global_seed, latent_shape, config["num_classes"])
        with autocast(args.precision, ctx.device):
            latents = guided_sample(sample_fn, run.ema, z.to(ctx.device), y.to(ctx.device), args.fid_cfg_scale)
        run.fid_monitor.update(decode_latents(vae, latents.float(), args.precision))  # (B, 3, H, W)
    fid = run.fid_monitor.compute()
    run.fid_monitor.reset()
    return fid


def log_fid(run: Run) -> None:
    step = run.state.train_steps
    fid = measure_fid(run)
    run.logger.info(f"(step={step:07d}) FID-{run.args.fid_num_samples}: {fid:.4f}")
    if run.wandb_run is not None:
        run.wandb_run.log({"fid": fid}, step=step)


@torch.no_grad()
def training_latents(run: Run, inputs: list[torch.Tensor]) -> torch.Tensor:
    """What the model learns, (N, C, L, L), from a batch's inputs: [images (N, 3, H, W) in [-1, 1]]
    (encoded by the VAE, or the pixels themselves with --vae none) or, with --feature-path, the
    cached posterior [mean, std] (N, 4, H/8, W/8) each.

    A fresh latent (mean + std * noise) * scale is what vae.encode(x).latent_dist.sample() * scale
    computes, with the same draw of torch.randn: training from features equals training from images.
    """
    device = run.ctx.device
    if run.args.feature_path is not None:
        mean, std = (tensor.to(device, non_blocking=True) for tensor in inputs)
        noise = torch.randn(mean.shape, device=device, dtype=mean.dtype)
        return (mean + std * noise).mul_(LATENT_SCALE)
    (images,) = inputs
    images = images.to(device, non_blocking=True)
    if run.vae is None:
        return images  # pixel space: the model learns (N, 3, H, W) in [-1, 1] directly
    with autocast(run.args.precision, device):
        posterior = run.vae.encode(images).latent_dist
    return posterior.sample().float().mul_(LATENT_SCALE)  # (N, 4, H/8, W/8)


def train_step(run: Run, inputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """One optimisation step on a batch (see training_latents) with labels (N,); returns the loss (on device).

    --precision autocasts the forward (fp16 scales the loss); --max-grad-norm clips (and records) the norm.
    """
    latents = training_latents(run, inputs)
    labels = labels.to(run.ctx.device, non_blocking=True)
    with autocast(run.args.precision, run.ctx.device):
        loss = run.transport.training_losses(run.ddp_model, latents, dict(y=labels))["loss"].mean()
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.args.max_grad_norm is not None:
        run.scaler.unscale_(run.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.max_grad_norm)
        run.monitor.add_grad_norm(grad_norm)
    run.scaler.step(run.opt)
    run.scaler.update()
    update_ema(run.ema, run.model, decay=run.args.ema_decay)
    return loss


def train_loop(run: Run) -> bool:
    """Train until --epochs, --max-steps or a stop signal; returns whether a signal stopped it."""
    args, state = run.args, run.state
    local_batch_size = args.global_batch_size // run.ctx.world_size
    finished = args.max_steps is not None and state.train_steps >= args.max_steps
    stopping = False
    while not (finished or stopping) and state.epoch < args.epochs:
        # A resumed epoch starts after the batches it had done; the order and flips depend on the epoch only.
        run.sampler.set_epoch(state.epoch, skip=state.epoch_step * local_batch_size)
        run.dataset.set_epoch(state.epoch)
        run.logger.info(f"Beginning epoch {state.epoch}...")
        show_bar = run.ctx.is_main and sys.stderr.isatty()
        for *inputs, labels in tqdm(run.loader, desc=f"epoch {state.epoch}", disable=not show_bar, leave=False):
            run.monitor.add(train_step(run, inputs, labels))
            state.train_steps += 1
            state.epoch_step += 1
            step = state.train_steps
            if step % args.log_every == 0:
                log_progress(run.monitor, step, args.global_batch_size, run.logger, run.wandb_run)
            if step % args.sample_every == 0:
                save_samples(run)  # before the checkpoint, so that its RNG state follows everything
            if args.fid_every is not None and step % args.fid_every == 0:
                log_fid(run)
            if step % args.ckpt_every == 0:
                save_checkpoint(run)
            finished = args.max_steps is not None and step >= args.max_steps
            stopping = not finished and run.stop.agreed()  # the same answer on every rank
            if finished or stopping:
                break
        else:
            state.epoch, state.epoch_step = state.epoch + 1, 0
    return stopping


def setup_experiment(args: argparse.Namespace, ctx: Any, checkpoint: Optional[dict], resuming: bool,
                     source: Optional[str]) -> tuple[Optional[str], logging.Logger, Any]:
    """Rank 0: the experiment folder (new, or the resumed one), its log.txt and wandb.

    Returns (experiment_dir, logger, wandb_run); every rank stops if rank 0 could not set up.
    """
    experiment_dir, wandb_run, logger = None, None, create_logger(None, is_main=False)
    setup_error = None
    if ctx.is_main:
        try:
            same_folder = experiment_dir_of(source) if resuming else None
            experiment_dir = same_folder or create_experiment_dir(args)
            os.makedirs(os.path.join(experiment_dir, "checkpoints"), exist_ok=True)
            logger = create_logger(experiment_dir, is_main=True)
            logger.info(f"Configuration: {json.dumps(dict(vars(args), world_size=ctx.world_size), sort_keys=True)}")
            logger.info(f"Experiment directory: {experiment_dir}")
            if args.wandb:
                # A checkpoint resumed outside its folder starts a new experiment, hence a new wandb run.
                wandb_run = init_wandb(args, experiment_dir, checkpoint.get("wandb_id") if same_folder else None)
                logger.info(f"wandb run id: {wandb_run.id}")
        except SystemExit as error:
            setup_error = error
        except OSError as error:  # e.g. a read-only or full results folder
            setup_error = SystemExit(f"train.py: error: cannot write the experiment folder ({error})")
    if not all_ranks_ok(setup_error is None, ctx.device):
        raise setup_error if setup_error is not None else SystemExit(1)
    return experiment_dir, logger, wandb_run


def load_vae_on_all_ranks(name: str, device: torch.device, loaded: Any = None) -> Any:
    """load_vae (None for --vae none); if any rank fails, every rank stops (rather than wait for it at
    the next collective). loaded: a VAE this rank already holds, kept (the rank still joins the check)."""
    if name == PIXEL_SPACE:
        return None
    vae, vae_error = loaded, None
    try:
        vae = vae if vae is not None else load_vae(name, device)
    except SystemExit as error:
        vae_error = error
    if not all_ranks_ok(vae_error is None, device):
        raise vae_error if vae_error is not None else SystemExit(1)
    return vae


def build_training(args: argparse.Namespace, ctx: Any, checkpoint: Optional[dict], resuming: bool,
                   source: Optional[str], logger: logging.Logger) -> tuple[SiT, torch.nn.Module, SiT, torch.optim.Optimizer]:
    """(model, DDP-wrapped model, EMA, AdamW), restored from the checkpoint when resuming."""
    model = build_model(args, checkpoint, resuming, source).to(ctx.device)
    use_ddp = dist.is_available() and dist.is_initialized()
    ddp_model = DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None) if use_ddp else model
    ema = deepcopy(model).requires_grad_(False).eval()  # after DDP's broadcast: the same start on every rank
    if checkpoint is not None and "ema" in checkpoint:
        ema.load_state_dict(checkpoint["ema"])
    model.grad_checkpointing = args.grad_checkpointing
    if args.compile:
        compile_model(model)  # after the EMA's deepcopy (see compile_model); DDP calls the compiled blocks
    opt = make_optimizer(model, lr=args.lr, weight_decay=0)  # the paper: AdamW, constant lr 1e-4, no weight decay
    if resuming:
        opt.load_state_dict(checkpoint["opt"])
        for group in opt.param_groups:  # the state holds the old lr; --lr (the checkpoint's unless given) rules
            group["lr"] = args.lr
        logger.info(f"Resumed from {source} at step {checkpoint['train_steps']} "
                    f"(epoch {checkpoint['epoch']}, batch {checkpoint['epoch_step']})")
    elif checkpoint is not None:
        logger.info(f"Fine-tuning the weights of {source} from step 0 with a fresh optimizer")
    logger.info(f"SiT parameters: {sum(param.numel() for param in model.parameters()):,} ({model.config})")
    return model, ddp_model, ema, opt


def restore_rng(checkpoint: dict, ctx: Any, seed: int, logger: logging.Logger) -> None:
    """This rank's RNG state from the checkpoint (exact continuation needs the same process count)."""
    stored = checkpoint["rng"]
    if len(stored) == ctx.world_size:
        restore_rng_state(stored[ctx.rank], ctx.device)
        return
    logger.warning(f"warning: the checkpoint was written by {len(stored)} processes, this run has {ctx.world_size}: "
                   f"random streams restart, so losses will not match an uninterrupted run")
    torch.manual_seed(seed + checkpoint["train_steps"])


def fid_monitor(args: argparse.Namespace, device: torch.device) -> Any:
    """The FID accumulator of --fid-every, with a one-line error if its statistics or weights are unusable.

    Building the Inception network draws random initial weights: it does so on forked RNGs, so the
    training streams (fresh, or restored on resume) are exactly those of a run without --fid-every.
    """
    from evaluate import FIDMonitor, InceptionWeightsError

    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return FIDMonitor(args.fid_ref, device, weights_path=args.fid_inception_weights)
    except (InceptionWeightsError, ValueError, OSError) as error:
        fail(f"cannot measure FID: {error}")


def train(args: argparse.Namespace, ctx: Any, dataset: TrainImageFolder, checkpoint: Optional[dict], resuming: bool,
          source: Optional[str], warnings: list[str], stop: StopSignal) -> None:
    """Set up (experiment, VAE, model, data), restore, train, save the final checkpoint."""
    configure_precision(args.precision)  # default tf32, as the original: TF32 matmuls on GPUs
    seed = args.global_seed * ctx.world_size + ctx.rank
    torch.manual_seed(seed)
    experiment_dir, logger, wandb_run = setup_experiment(args, ctx, checkpoint, resuming, source)
    for warning in warnings:
        logger.warning(f"warning: {warning}")
    if args.feature_path is None:
        vae = load_vae_on_all_ranks(args.vae, ctx.device)
        channels = 3 if vae is None else vae.config.latent_channels
    else:
        vae = None  # cached latents: no VAE on the device (save_samples loads one for the previews)
        channels = dataset.meta["latent_shape"][0]
    model, ddp_model, ema, opt = build_training(args, ctx, checkpoint, resuming, source, logger)
    if channels != model.config["in_channels"]:
        fail(f"the {'pixels have' if vae is None else 'VAE has'} {channels} channels, the model {model.config['in_channels']}")
    loader, sampler = build_loader(args, dataset, ctx.rank, ctx.world_size, seed)
    logger.info(f"Dataset contains {len(dataset):,} images in {len(dataset.classes)} classes "
                f"({args.data_path or args.feature_path})")
    fid = fid_monitor(args, ctx.device) if args.fid_every is not None else None  # on forked RNGs
    state = TrainState()
    if resuming:
        state = TrainState(checkpoint["train_steps"], checkpoint["epoch"], checkpoint["epoch_step"])
        restore_rng(checkpoint, ctx, seed, logger)  # last: nothing may draw random numbers after this
    run = Run(args=args, ctx=ctx, model=model, ddp_model=ddp_model, ema=ema, opt=opt, vae=vae,
              transport=transport_from_args(args), dataset=dataset, loader=loader, sampler=sampler, state=state,
              logger=logger, experiment_dir=experiment_dir, wandb_run=wandb_run, stop=stop,
              preview=preview_inputs(args, model.config), monitor=LossMonitor(state.train_steps + 1),
              last_saved_step=state.train_steps if resuming else None,
              scaler=make_grad_scaler(args.precision, ctx.device), fid_monitor=fid)
    if resuming and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])  # fp16: the loss scale continues too
    del checkpoint  # the loaded tensors are no longer needed

    ddp_model.train()  # enables label dropout for classifier-free guidance
    limit = f" or {args.max_steps} steps" if args.max_steps else ""
    logger.info(f"Training for {args.epochs} epochs{limit}...")
    stopped = train_loop(run)
    if stopped:
        logger.info(f"Received {stop.received or 'a stop signal on another rank'}: stopping at step {state.train_steps}")
    if state.train_steps > 0 and run.last_saved_step != state.train_steps:
        save_checkpoint(run)
    ddp_model.eval()  # disables label dropout
    if wandb_run is not None:
        wandb_run.finish()
    logger.info("Done!")


def open_feature_dataset(args: argparse.Namespace, explicit: set[str]) -> LatentFeatureDataset:
    """The cached latents of --feature-path, checked against --image-size; without an explicit
    --vae, previews decode with the VAE that made the features. Raises ValueError."""
    dataset = LatentFeatureDataset(args.feature_path, seed=args.global_seed, random_flip=args.random_flip)
    meta = dataset.meta
    if meta["image_size"] != args.image_size:
        raise ValueError(f"the features in {args.feature_path} are of {meta['image_size']}px images, "
                         f"not --image-size {args.image_size}: pass --image-size {meta['image_size']}")
    if "vae" not in explicit and meta.get("vae"):
        args.vae = meta["vae"]
    dataset.classes = meta["classes"]  # as TrainImageFolder's, for the checks and the log
    return dataset


def main(argv: Optional[list[str]] = None) -> None:
    """Check the command line and data, join the job, train; one-line errors, exit 0 on a stop signal."""
    args, explicit = parse_args(argv)
    validate_args(args, launched_world_size())
    source, checkpoint, warnings = start_checkpoint(args)
    resuming = checkpoint is not None and is_train_checkpoint(checkpoint)
    if resuming:
        warnings += adopt_checkpoint_settings(args, explicit, checkpoint, source)
    validate_args(args, launched_world_size())
    try:
        if args.feature_path is not None:
            dataset = open_feature_dataset(args, explicit)
        else:
            dataset = TrainImageFolder(args.data_path, args.image_size, seed=args.global_seed,
                                       random_flip=args.random_flip)
    except ValueError as error:
        fail(str(error))
    if len(dataset.classes) > args.num_classes:
        fail(f"{'--feature-path' if args.feature_path else '--data-path'} has {len(dataset.classes)} class folders "
             f"but --num-classes is {args.num_classes}")

    stop = StopSignal()
    stop.install()
    ctx = setup_distributed()
    stop.connect()
    try:
        train(args, ctx, dataset, checkpoint, resuming, source, warnings, stop)
    except TrainingDiverged as error:
        logging.getLogger("sit").error(f"{error}; stopping, the last good checkpoint is kept")
        fail(f"{error}; stopping, the last good checkpoint is kept")
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
