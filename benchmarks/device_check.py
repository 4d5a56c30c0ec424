"""Every GPU path of the project, run once, in one command (<= 8 minutes on one GPU):

    python benchmarks/device_check.py                    # everything; exit 1 if any check FAILs
    python benchmarks/device_check.py --only parity sdpa  # some checks (names below)

Prints a table (check | result | figure | tolerance): golden parity of the model and of one ODE and
one SDE sample against the original's recording (fp32), bf16/fp16 autocast training of SiT-S/2
against fp32, --compile without recompiles over training and sampler steps, the SDPA kernel picked
for SiT-XL/2's attention in bf16, a world-size-1 process group through torchrun's setup (NCCL on a
GPU) with FSDP2 steps, sample.py end to end on a random SiT-XL/2 and SD-VAE, and benchmarks/bench.py
for SiT-XL/2 at 256 (batch 64, bf16, compile) against the original-style loop, with the speed targets.
On a CPU the checks whose code runs there use small sizes and the CUDA-only ones say SKIPPED (exit 0).
Speed below a target is MISS, which fails the run only with --strict-targets.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from sit.cli import run_main  # noqa: E402
from sit.device_check import CHECKS, Row, run_checks  # noqa: E402
from sit.errors import RunFailure  # noqa: E402
from sit.files import atomic_json  # noqa: E402

FIXTURE = os.path.join(REPO, "tests", "fixtures", "parity.pt")
WIDTHS = (44, 7, 70)  # check, result, figure; the tolerance ends the line


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), default=None, help="run only these checks")
    parser.add_argument("--skip", nargs="+", choices=list(CHECKS), default=[], help="leave these checks out")
    parser.add_argument("--strict-targets", action="store_true", help="a speed target missed (MISS) fails the run too")
    parser.add_argument("--json", type=str, default=None, help="also write the rows to this JSON file")
    return parser.parse_args(argv)


def format_row(row: Row) -> str:
    cells = [row.check, row.result, row.figure]
    return " | ".join(cell.ljust(width) for cell, width in zip(cells, WIDTHS)) + f" | {row.tolerance}"


def report(name: str, rows: list[Row], seconds: float) -> None:
    """Each check's rows as soon as it ends (a long run shows progress), with its time on stderr."""
    for row in rows:
        print(format_row(row), flush=True)
    print(f"  ({name}: {seconds:.1f} s)", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    """Run the checks and print the table; RunFailure (exit 1) naming the checks that failed."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    print(format_row(Row("check", "result", "figure", "tolerance")), flush=True)
    names = [check for check in (args.only or CHECKS) if check not in args.skip]
    rows = run_checks(names, REPO, device, FIXTURE, report)
    failing = {"FAIL", "MISS"} if args.strict_targets else {"FAIL"}
    failed = [row.check for row in rows if row.result in failing]
    counts = {result: sum(row.result == result for row in rows) for result in ("PASS", "FAIL", "MISS", "SKIPPED", "INFO")}
    print("summary: " + ", ".join(f"{count} {result}" for result, count in counts.items() if count), flush=True)
    if args.json:
        atomic_json(args.json, dict(device=name, torch=torch.__version__, rows=[vars(row) for row in rows]))
    if failed:
        raise RunFailure(f"{len(failed)} check(s) failed: {'; '.join(failed)}")


if __name__ == "__main__":
    sys.exit(run_main(main, "device_check.py"))
