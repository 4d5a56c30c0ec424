"""Train SiT with PyTorch DDP: one process (`python train.py ...`), one machine or many (torchrun).

    torchrun --nnodes=1 --nproc_per_node=N train.py --model SiT-XL/2 --data-path /path/to/imagenet/train

--sharding fsdp shards model, gradients, AdamW state and EMA over the processes (FSDP2) for models
past one GPU's memory; its checkpoints are the same full files (see sit/training/sharding.py).

Each run writes to results/<NNN>-<model>-<path>-<prediction>-<loss weight>/ (<model>: with --model-config
the real shape's name, e.g. custom-d4-w64-p2): log.txt, checkpoints/<step>.pt, latest.txt (the newest
checkpoint's path), samples/<step>.png, preview_labels.txt and (with --wandb) wandb_id.txt. A checkpoint holds
everything needed to continue exactly: model, EMA, optimizer, step, epoch, position in the epoch and every
rank's RNG.

Resume (continues in the same experiment folder; losses equal those of an uninterrupted run):
    --resume                          the newest checkpoint of the newest experiment in --results-dir
                                      (refused if that one died before its first checkpoint)
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
them in a new experiment from step 0. SIGTERM/SIGINT: finish the step, save a checkpoint, exit 0
(every torchrun worker; torchrun itself exits 1 after a signal: see the README). One run per
experiment folder (its owner.lock); a full disk or a malformed checkpoint is one line.

Pixel space (`--vae none`): the model learns images in [-1, 1] directly (3 channels, input size =
image size, any size the patch size divides), e.g. the 8x8 digits of the README's CPU quick start.

Representation alignment (--repa-encoder dinov2-vit-b --repa-depth 8 --repa-coeff 0.5, REPA's recipe;
sit/training/repa.py) and time-step schedules (--time-sampling logit-normal --time-shift S;
transport/schedules.py) are options, off by default.
Options of today's recipes, off by default: post-hoc EMA snapshots (--phema-stds; reconstruct_ema.py
builds any EMA length from them) and self-healing (--max-rollbacks, --spike-factor: roll back to the
last good state and skip the batch that diverged); see the README.

The work is done by sit.training (settings, experiment, network, step, loop); this script parses the
flags, builds the checked plan once (sit.training.launch.prepare_training) and runs it.
"""
from __future__ import annotations

import argparse
from typing import Optional

from models import SiT_models
from sit.cli import (ScriptParser, add_speed_arguments, decay_rate, exit_process, guidance_scale,
                     non_negative_float, non_negative_int, parse_with_explicit, positive_float, positive_int,
                     run_main)
from sit.declarations import add_flags
from sit.distributed import launched_world_size
from sit.training.experiment import NEWEST
from sit.training.launch import prepare_training, run_training
from sit.training.registry import FEATURES
from sit.training.settings import EMA_DECAY, MODEL_CONFIG_KEYS
from sit.training.sharding import SHARDINGS
from train_utils import parse_transport_args
from transport.schedules import TIME_SAMPLINGS


def build_parser() -> argparse.ArgumentParser:
    # Default args train SiT-XL/2 with the paper's hyperparameters (except the number of steps).
    parser = ScriptParser(description="Train SiT (see the module docstring for resuming).",
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
    parser.add_argument("--cfg-scale", type=guidance_scale, default=4.0,
                        help="guidance of the preview samples, >= 1 (1: none)")
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
    parser.add_argument("--sharding", choices=SHARDINGS, default="ddp",
                        help="ddp: a full copy of model, gradients, AdamW and EMA per GPU (the original's); fsdp: "
                             "FSDP2 shards all four over the GPUs (with --precision bf16: bf16 weights, fp32 "
                             "gradient reduction); checkpoints are the same full files either way")
    fid = parser.add_argument_group("FID while training (evaluate.py's definitions)")
    fid.add_argument("--fid-every", type=positive_int, default=None, help="measure FID every N steps (default: never)")
    fid.add_argument("--fid-num-samples", type=positive_int, default=10_000, help="EMA samples per measurement, over all ranks")
    fid.add_argument("--fid-ref", type=str, default=None,
                     help="reference statistics: an ADM reference batch with mu/sigma, or the .stats.npz evaluate.py caches")
    fid.add_argument("--fid-steps", type=positive_int, default=50, help="Euler ODE steps of the FID samples")
    fid.add_argument("--fid-cfg-scale", type=guidance_scale, default=1.0, help="guidance of the FID samples, >= 1")
    fid.add_argument("--fid-inception-weights", type=str, default=None,
                     help="a local Inception weights file (default: downloaded once by torch-fidelity)")
    times = parser.add_argument_group("time-step schedule of training (transport/schedules.py; t=0 noise, t=1 data)")
    times.add_argument("--time-sampling", type=str, choices=TIME_SAMPLINGS, default="uniform",
                      help="how t is drawn: uniform (the original's) or logit-normal (SD3, LightningDiT)")
    times.add_argument("--time-mean", type=float, default=0.0, help="mean of the logit-normal's normal")
    times.add_argument("--time-std", type=positive_float, default=1.0, help="std of the logit-normal's normal")
    times.add_argument("--time-shift", type=positive_float, default=None,
                      help="shift t -> t / (t + s (1 - t)); s > 1 draws more times near the noise end (default: none)")
    for feature in FEATURES.values():  # REPA, post-hoc EMA, self-healing, ...: their declared settings
        if feature.settings:
            add_flags(parser, feature.settings)
    add_speed_arguments(parser)
    parse_transport_args(parser)
    return parser


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, frozenset[str]]:
    """The parsed flags, and which of them the command line gave explicitly."""
    return parse_with_explicit(build_parser, argv)


def main(argv: Optional[list[str]] = None) -> None:
    """Parse, build the checked plan (one-line errors before heavy work), join the job and train."""
    args, explicit = parse_args(argv)
    plan = prepare_training(dict(vars(args)), explicit, launched_world_size())
    run_training(plan)


if __name__ == "__main__":
    exit_process(run_main(main, "train.py"))
