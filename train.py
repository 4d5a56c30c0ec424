"""Train SiT with PyTorch DDP: one process (`python train.py ...`), one machine or many (torchrun).

    torchrun --nnodes=1 --nproc_per_node=N train.py --model SiT-XL/2 --data-path /path/to/imagenet/train

Each run writes results/<NNN>-<model>-<path>-<prediction>-<loss weight>/: log.txt, checkpoints/<step>.pt,
latest.txt, samples/<step>.png, metrics.jsonl. A checkpoint holds everything needed to continue exactly.
Resume (same folder; losses equal an uninterrupted run's; model and transport settings are the checkpoint's):
    --resume                          the newest checkpoint of the newest experiment in --results-dir
    --resume results/003-SiT-XL-2-... the newest checkpoint of that experiment
    --ckpt results/003-.../checkpoints/0050000.pt   that checkpoint (bare weights: fine-tune from step 0)
SIGTERM/SIGINT: finish the step, save a checkpoint, exit 0. Options (--sharding fsdp, REPA, time-step
schedules, post-hoc EMA, self-healing, MeanFlow): docs/training.md. The work is done by sit.training.
"""
from __future__ import annotations

import argparse
from typing import Optional

from sit.cli import ScriptParser, exit_process, parse_with_explicit, run_main
from sit.distributed import launched_world_size
from sit.training.launch import plan_training, run_training
from sit.training.settings import add_train_flags


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags (sit.training.settings); defaults: SiT-XL/2 with the paper's hyperparameters."""
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
