"""Sample quality metrics in PyTorch with the ADM evaluation suite's definitions, and edm2's FD-DINOv2.

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples/<folder>.npz [--json metrics.json]
        [--metrics is,fid,sfid,precision,recall,fd_dinov2]

The sample batch's record (`<folder>.json`) is checked against the .npz and copied into --json; the
reference's statistics are cached beside it (ref.stats.npz), which alone is written without a sample
batch (docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch

from sit.cli import ScriptParser, non_negative_int, positive_int, run_main
from sit.errors import UsageError
from sit.files import atomic_json, folder_problem
from sit.metrics import (DEFAULT_METRICS, FID_METHODS, METRICS, Evaluator, format_table, open_npz_images,
                         parse_metric_list)
from sit.record import SampleRecord, record_beside, record_path
from sit.speed import configure_precision


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (argparse's own errors: one line, exit 2)."""
    parser = ScriptParser(description="IS, FID, sFID, precision and recall (ADM definitions) and "
                                      "FD-DINOv2 of a sample batch against a reference batch.",
                          allow_abbrev=False)
    parser.add_argument("ref_batch", help="reference .npz: arr_0 (N, H, W, 3) uint8 and/or mu, sigma, mu_s, sigma_s")
    parser.add_argument("sample_batch", nargs="?", default=None,
                        help="sample .npz with arr_0 (N, H, W, 3) uint8; omit to only cache the reference statistics")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per feature-network call")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the feature networks run (default: cuda when there is a GPU)")
    parser.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader workers reading the npz")
    parser.add_argument("--fid-method", choices=list(FID_METHODS), default="eigh",
                        help="how tr((s1 s2)^1/2) is computed: eigh (fast, symmetric) or sqrtm (ADM's exact code path)")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--ignore-record", action="store_true",
                        help="evaluate without the sample record beside the .npz (<folder>.json): neither read "
                             "nor checked nor copied, e.g. one that describes other images")
    parser.add_argument("--inception-weights", default=None,
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth or NVlabs' TorchScript "
                             "inception-2015-12-05.pt (default: torch-fidelity's, downloaded once to the torch hub "
                             "cache)")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help=f"comma-separated, from {','.join(METRICS)} (default: %(default)s)")
    parser.add_argument("--dinov2-weights", default=None,
                        help="DINOv2 ViT-L/14 weights for fd_dinov2 (default: the torch hub's "
                             "dinov2_vitl14_pretrain.pth, else timm's vit_large_patch14_dinov2.lvd142m)")
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> None:
    """UsageError for a CUDA device that is not there or a batch file that does not exist."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    for path in (args.ref_batch, args.sample_batch):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"no such file: {path}")
    if args.json is not None and args.sample_batch is not None and \
            os.path.abspath(args.json) == os.path.abspath(record_path(args.sample_batch)):
        raise UsageError(f"--json {args.json} is the sample batch's record; write the metrics elsewhere")
    if args.json is not None and args.sample_batch is None:
        raise UsageError(f"--json writes the metrics of a sample batch; with only {args.ref_batch} there are none "
                         f"(the reference statistics are cached beside it): pass the sample .npz too, or drop --json")
    problem = None if args.json is None else (f"{args.json} is a folder" if os.path.isdir(args.json)
                                              else folder_problem(os.path.dirname(os.path.abspath(args.json))))
    if problem:  # found now, not after the metrics were computed
        raise UsageError(f"--json {args.json}: {problem}; name a file in a folder you can write")
    networks = {METRICS[name].network for name in parse_metric_list(args.metrics)}
    for flag, value, network, metrics in (("--dinov2-weights", args.dinov2_weights, "dinov2", "fd_dinov2"),
                                          ("--inception-weights", args.inception_weights, "inception",
                                           "is, fid, sfid, precision or recall")):
        if value is not None and network not in networks:
            raise UsageError(f"{flag} is read only for --metrics {metrics}, which --metrics {args.metrics} leaves "
                             f"out: drop {flag} or add the metric")


def sample_record(args: argparse.Namespace) -> Optional[SampleRecord]:
    """The record beside the sample batch, checked against it (None without one, or with --ignore-record);
    RecordError for a record of other images, a warning for one without hashes (unverified)."""
    shape = open_npz_images(args.sample_batch).shape  # uint8 (N, H, W, 3), N > 0
    if args.ignore_record:
        return None
    record = record_beside(args.sample_batch, shape[0], shape[1:])
    if record is not None and record.images_sha256 is None:
        print(f"warning: {record_path(args.sample_batch)} holds no SHA-256 of the images it describes (written "
              f"before records held them): copied as unverified", file=sys.stderr)
    return record


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Print the metrics table (and write --json), or only cache the reference statistics."""
    args = parse_args(argv)
    check_inputs(args)
    metric_names = parse_metric_list(args.metrics)
    configure_precision("fp32")  # full float32 matmuls and convolutions, like the TensorFlow reference
    evaluator = Evaluator(args.device, args.inception_weights, args.batch_size, args.num_workers, args.fid_method,
                          metric_names, args.dinov2_weights)
    if args.sample_batch is None:
        evaluator.cache_reference(args.ref_batch)
        return
    record = sample_record(args)  # refused before any network loads
    metrics = evaluator.evaluate(args.ref_batch, args.sample_batch)
    print(format_table(metrics, metric_names))
    if args.json is not None:
        verified = None if record is None else record.images_sha256 is not None  # by SHA-256 (sample_record)
        atomic_json(args.json, {**metrics, "ref_batch": args.ref_batch, "sample_batch": args.sample_batch,
                                "fid_method": args.fid_method, "evaluator": evaluator.settings(args.ref_batch),
                                "sample_record": None if record is None else record.to_dict(),
                                "sample_record_verified": verified})


if __name__ == "__main__":
    sys.exit(run_main(main, "evaluate.py"))
