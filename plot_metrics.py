"""Draw the loss / FID / throughput curves of one or more training runs into one PNG, overlaid for comparison.

    python plot_metrics.py results/000-SiT-B-2-Linear-velocity-None results/001-SiT-B-2-Linear-velocity-None \
        --output compare.png

Each RUN is an experiment folder (or its metrics.jsonl, which train.py appends at each log line, FID
measurement and rollback; see sit/training/metrics_log.py). One panel per quantity a run has (loss,
each further loss term, grad norm, lr when scheduled, FID, images/s), one line per run, labelled by
its folder's name. The work is done by sit.training.metrics_plot.plot_runs.
"""
from __future__ import annotations

import argparse
from typing import Optional

from sit.cli import ScriptParser, exit_process, run_main


def build_parser() -> argparse.ArgumentParser:
    """plot_metrics.py's arguments."""
    parser = ScriptParser(description="Plot the metrics.jsonl of training runs into one PNG.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="an experiment folder (or its metrics.jsonl)")
    parser.add_argument("--output", "-o", default="metrics.png", help="the PNG to write (default: metrics.png)")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """Parse, plot, say what was written."""
    from sit.training.metrics_plot import plot_runs

    args = build_parser().parse_args(argv)
    panels = plot_runs(args.runs, args.output)
    print(f"Saved {args.output}: {', '.join(panels)} of {len(args.runs)} run{'s' if len(args.runs) != 1 else ''}")


if __name__ == "__main__":
    exit_process(run_main(main, "plot_metrics.py"))
