"""Build an EMA of any length after training, from the post-hoc EMA snapshots of train.py --phema-stds.

    python train.py ... --phema-stds 0.050,0.100 --phema-every 10000
    python reconstruct_ema.py results/000-SiT-XL-2-Linear-velocity-None --std 0.100,0.150
    python reconstruct_ema.py results/000-SiT-XL-2-Linear-velocity-None --ema-decay 0.9999

--std: power-function EMAs of those relative stds; --ema-decay: the traditional EMA (the math:
sit.training.reconstruction). Written to <experiment>/reconstructed/<step>-<std or decay>.pt (or --out-dir),
a checkpoint that sample.py, sample_ddp.py and train.py --ckpt take as it is.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from sit.cli import ScriptParser, checked_number, positive_int, run_main
from sit.errors import UsageError
from sit.files import remove_temporaries
from sit.training.phema import std_list
from sit.training.reconstruction import EMATarget, plan_reconstruction, snapshot_folder, write_reconstruction

open_unit_interval = checked_number(float, lambda x: 0.0 < x < 1.0, "in (0, 1)", "open_unit_interval")
SHARE_WARNING = 0.01  # warn when the initial weights' share of a traditional EMA exceeds this
RESIDUAL_WARNING = 0.05  # the fitted profile's relative L2 distance from the target's: warn above this,
RESIDUAL_LIMIT = 0.25    # and refuse above this (the snapshots cannot express that EMA)


def build_parser() -> argparse.ArgumentParser:
    parser = ScriptParser(description="Reconstruct an EMA of any length from post-hoc EMA snapshots.",
                          allow_abbrev=False)
    parser.add_argument("snapshots", help="an experiment folder of train.py --phema-stds (or its phema/ folder)")
    targets = parser.add_argument_group("the EMAs to build (one checkpoint each)")
    targets.add_argument("--std", type=std_list, help="relative standard deviations of power-function EMAs, e.g. 0.1,0.15")
    targets.add_argument("--ema-decay", type=open_unit_interval, help="a traditional EMA of this decay per step, e.g. 0.9999")
    parser.add_argument("--step", type=positive_int, help="the step to build them at: a snapshot's (default: the newest)")
    parser.add_argument("--out-dir", help="where to write them (default: <experiment>/reconstructed)")
    return parser


def targets_of(args: argparse.Namespace) -> list[EMATarget]:
    """The EMAs the flags ask for: each --std, then --ema-decay; UsageError when none."""
    targets = [EMATarget(std=std) for std in (args.std or ())]
    if args.ema_decay is not None:
        targets.append(EMATarget(decay=args.ema_decay))
    if not targets:
        raise UsageError("pass --std LIST and/or --ema-decay DECAY: the EMAs to reconstruct")
    return targets


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    targets = targets_of(args)
    if not os.path.isdir(args.snapshots):
        raise UsageError(f"{args.snapshots} is not a folder: pass an experiment folder of train.py --phema-stds")
    folder = snapshot_folder(args.snapshots)
    beside = os.path.join(os.path.dirname(os.path.abspath(folder)), "reconstructed")  # in <experiment>
    out_dir = beside if args.out_dir is None else args.out_dir
    removed = remove_temporaries(out_dir, ".pt")  # what a killed reconstruct_ema.py left unfinished
    if removed:
        print(f"removed {removed} unfinished files a killed run left in {out_dir}")
    for target in targets:
        plan = plan_reconstruction(folder, target, args.step, flag="snapshots")
        path = os.path.join(out_dir, f"{plan.step:07d}-{target.name}.pt")
        print(f"{target.name} at step {plan.step}: {len(plan.terms)} snapshot EMAs from {len(plan.files)} files, "
              f"profile fit residual {plan.residual:.2e} (relative L2)")
        if plan.residual > RESIDUAL_LIMIT:
            raise UsageError(f"--{'std' if target.std is not None else 'ema-decay'} {target.std or target.decay}: the "
                             f"snapshots in {folder} fit that EMA's profile only to {plan.residual:.0%} (relative L2, "
                             f"limit {RESIDUAL_LIMIT:.0%}); ask for an EMA between the tracked stds, or snapshot more often")
        if plan.residual > RESIDUAL_WARNING:
            print(f"warning: {target.name}: the snapshots fit its profile only to {plan.residual:.1%} (relative L2); "
                  f"the result is an approximate EMA", file=sys.stderr)
        if plan.missing_share > SHARE_WARNING:
            print(f"warning: the EMA of decay {target.decay} gives the initial weights a share of "
                  f"{plan.missing_share:.3f} at step {plan.step}, but there is no snapshot of step 0 (the initial "
                  f"weights): the reconstruction spreads that share over the trained weights", file=sys.stderr)
        write_reconstruction(plan, path)
        print(f"Saved {path}")


if __name__ == "__main__":
    sys.exit(run_main(main, "reconstruct_ema.py"))
