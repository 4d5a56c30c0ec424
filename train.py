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
(every torchrun worker; torchrun itself exits 1 after a signal: see docs/reliability.md). One run per
experiment folder (its owner.lock); a full disk or a malformed checkpoint is one line.

Pixel space (`--vae none`): the model learns images in [-1, 1] directly (3 channels, input size =
image size, any size the patch size divides), e.g. the 8x8 digits of the README's CPU quick start.

Representation alignment (--repa-encoder dinov2-vit-b --repa-depth 8 --repa-coeff 0.5, REPA's recipe;
sit/training/repa.py) and time-step schedules (--time-sampling logit-normal --time-shift S;
transport/schedules.py) are options, off by default.
Options of today's recipes, off by default: post-hoc EMA snapshots (--phema-stds; reconstruct_ema.py
builds any EMA length from them) and self-healing (--max-rollbacks, --spike-factor: roll back to the
last good state and skip the batch that diverged); see docs/training.md.

The work is done by sit.training (settings, experiment, network, step, loop); this script parses the
flags, builds the checked plan once (sit.training.launch.plan_training) and runs it.
"""
from __future__ import annotations

import argparse
from typing import Optional

from sit.cli import ScriptParser, exit_process, parse_with_explicit, run_main
from sit.distributed import launched_world_size
from sit.training.launch import plan_training, run_training
from sit.training.settings import add_train_flags


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags, built from the settings' declarations (sit.training.settings and each feature's
    module); defaults train SiT-XL/2 with the paper's hyperparameters (except the number of steps)."""
    parser = ScriptParser(description="Train SiT (see the module docstring for resuming).", allow_abbrev=False)
    add_train_flags(parser)
    return parser


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, frozenset[str]]:
    """The parsed flags, and which of them the command line gave explicitly."""
    return parse_with_explicit(build_parser, argv)


def main(argv: Optional[list[str]] = None) -> None:
    """Parse, build the checked plan (one-line errors before heavy work), join the job and train."""
    args, explicit = parse_args(argv)
    plan = plan_training(dict(vars(args)), explicit, launched_world_size())
    run_training(plan)


if __name__ == "__main__":
    exit_process(run_main(main, "train.py"))
