"""Sample quality metrics in PyTorch with the ADM evaluation suite's definitions.

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples/<folder>.npz [--json metrics.json]

Inception Score, FID, sFID, precision and recall as openai/guided-diffusion's `evaluations/evaluator.py`
defines them, computed with the TensorFlow-ported FID Inception-v3 of torch-fidelity:
- FID, precision and recall use the 2048 `pool_3` features;
- sFID uses the spatial features `mixed_6/conv` (Mixed_6d.branch1x1 here), first 7 channels of the
  17x17 map, flattened in TensorFlow's (H, W, C) order so the ADM files' `mu_s`/`sigma_s` apply;
- Inception Score uses softmax over the 1008 bias-free logits `pool_3 @ W` (ADM's softmax graph;
  torch-fidelity's `logits_unbiased`), in splits of 5000 images (10 splits for 50k samples);
- precision/recall use k=3 nearest-neighbour manifolds (squared Euclidean distances, `<=` test).
  Distances are computed in float32; ADM uses float16 with a float32 fallback.
The trace of the covariance square root comes from a symmetric eigendecomposition by default
(`--fid-method sqrtm` runs ADM's scipy sqrtm path; both agree to ~1e-12 on full-rank statistics).

Reference batches: `arr_0` (N, H, W, 3) uint8 images, optionally with precomputed `mu`, `sigma`,
`mu_s`, `sigma_s` (which then take precedence for FID/sFID, as in ADM). Reference statistics and
pool features are cached beside the file (ref.npz -> ref.stats.npz). With no sample batch the
script only writes that cache, which `FIDMonitor` (FID during training) can read.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import zipfile
from typing import Optional

import torch

from sit.cli import non_negative_int, positive_int
from sit.files import atomic_write
from sit.metrics import FID_METHODS, Evaluator, InceptionWeightsError


#################################################################################
#                                    Script                                     #
#################################################################################

METRIC_NAMES = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID",
                "precision": "Precision", "recall": "Recall"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="IS, FID, sFID, precision and recall (ADM definitions) of a "
                                                 "sample batch against a reference batch.")
    parser.add_argument("ref_batch", help="reference .npz: arr_0 (N, H, W, 3) uint8 and/or mu, sigma, mu_s, sigma_s")
    parser.add_argument("sample_batch", nargs="?", default=None,
                        help="sample .npz with arr_0 (N, H, W, 3) uint8; omit to only cache the reference statistics")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader workers reading the npz")
    parser.add_argument("--fid-method", choices=list(FID_METHODS), default="eigh",
                        help="how tr((s1 s2)^1/2) is computed: eigh (fast, symmetric) or sqrtm (ADM's exact code path)")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--inception-weights", default=None,
                        help="local torch-fidelity Inception weights file (default: download once to the torch hub cache)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    for path in (args.ref_batch, args.sample_batch):
        if path is not None and not os.path.isfile(path):
            parser.error(f"no such file: {path}")
    return args


def format_table(metrics: dict) -> str:
    lines = [f"{'Metric':<16} {'Value':>12}"]
    for key, name in METRIC_NAMES.items():
        value = metrics[key]
        lines.append(f"{name:<16} {'n/a' if value is None else format(value, '12.4f'):>12}")
    return "\n".join(lines)


def dump_json(data: dict, path: str) -> None:
    with open(path, "w") as file:
        json.dump(data, file, indent=2)


def write_json(path: str, metrics: dict) -> None:
    """The metrics as JSON, written to a temporary name and renamed."""
    atomic_write(path, functools.partial(dump_json, metrics), suffix=".json")


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # full float32, like the TensorFlow reference
    torch.backends.cudnn.allow_tf32 = False
    evaluator = Evaluator(args.device, args.inception_weights, args.batch_size, args.num_workers, args.fid_method)
    try:
        if args.sample_batch is None:
            evaluator.reference(args.ref_batch)
            return
        metrics = evaluator.evaluate(args.ref_batch, args.sample_batch)
    except (InceptionWeightsError, ValueError, zipfile.BadZipFile, OSError) as error:
        raise SystemExit(f"error: {error}")
    print(format_table(metrics))
    if args.json is not None:
        write_json(args.json, {**metrics, "ref_batch": args.ref_batch, "sample_batch": args.sample_batch,
                               "fid_method": args.fid_method})


if __name__ == "__main__":
    main()
