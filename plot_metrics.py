"""Draw the metrics.jsonl curves of one or more training runs into one PNG, overlaid for comparison
(sit.training.metrics_plot.plot_runs):

    python plot_metrics.py results/000-SiT-B-2-Linear-velocity-None results/001-... --output compare.png
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
