"""Sample many images from a SiT with one or more processes, for FID and other metrics; or evaluate
log-likelihoods (--likelihood).

    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py ODE --model SiT-XL/2 --num-fid-samples 50000
    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py ODE --likelihood --data-path /path/to/imagenet/val

Images go to <sample-dir>/<folder>/000000.png ..., where <folder> names every setting that changes
the images, then into <sample-dir>/<folder>.npz (arr_0: uint8 (N, H, W, 3), the format of the ADM
evaluation suite: https://github.com/openai/guided-diffusion/tree/main/evaluations; labels: (N,) int64,
the class each image was conditioned on). --ckpt may name a train.py experiment folder (its newest
checkpoint) or a results folder (its newest experiment's).

Reproducible and resumable:
- image i's noise and label come from a generator seeded by (global seed, i);
- indices are cut into fixed blocks of --per-proc-batch-size, dealt to ranks in turn, and each block
  is always sampled as one batch; the SDE's noise (drawn from the global RNG inside the sampler) is
  seeded per block from the block's first index. So the images do not depend on the number of
  processes. They may depend on the batch size (SDE noise, adaptive ODE step sizes are chosen per
  batch), which is why the folder name includes it;
- a block with any PNG missing is sampled again (only its missing PNGs are written); PNGs are
  written to a temporary name and renamed, so a killed run leaves no half-written file and the
  same command continues where it stopped.
Works with NCCL on GPUs and with Gloo on CPU (torchrun), or as a plain single process.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Optional, Sequence

from sit.cli import non_negative_int, parse_with_explicit, positive_int, run_main
from sit.distributed import DistContext, barrier, cleanup_distributed, main_first, on_main, setup_distributed
from sit.log import create_logger
from sit.sampling.flags import add_likelihood_arguments, sampling_mode, sampling_parser
from sit.sampling.folder import finish_npz, prepare_sample_folder
from sit.sampling.images import sampled_labels, write_missing_images
from sit.sampling.likelihood import evaluate_likelihood
from sit.sampling.loading import load_for_sampling, setup_torch
from sit.sampling.settings import SamplingConfig, sampling_config
from sit.speed import configure_cpu_threads


def add_ddp_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-dir", type=str, default="samples")
    parser.add_argument("--per-proc-batch-size", type=positive_int, default=4)
    parser.add_argument("--num-fid-samples", type=positive_int, default=50_000,
                        help="number of images to sample (with --likelihood: to evaluate)")
    parser.add_argument("--global-seed", type=non_negative_int, default=0)
    add_likelihood_arguments(parser)


def build_parser(mode: Optional[str]) -> argparse.ArgumentParser:
    return sampling_parser(mode, description="Sample many images from a SiT (DDP), or evaluate log-likelihoods.",
                           vae_default="ema", cfg_default=1.0, add_script_arguments=add_ddp_arguments)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, SamplingConfig]:
    """The flags and their SamplingConfig; UsageError (or argparse's exit 2) for a bad command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = sampling_mode(argv)
    args, given = parse_with_explicit(functools.partial(build_parser, mode), argv)
    config = sampling_config(vars(args), given, seed=args.global_seed, num_images=args.num_fid_samples,
                             batch_size=args.per_proc_batch_size)
    return args, config


def run(ctx: DistContext, config: SamplingConfig, sample_dir: str) -> None:
    """Sample the missing images and build the .npz, or evaluate the likelihoods (every rank)."""
    logger = create_logger(None, ctx.is_main)
    logger.info(f"Starting rank={ctx.rank}, world_size={ctx.world_size}, device={ctx.device}")
    threads = configure_cpu_threads(ctx.device)  # on a CPU: OMP_NUM_THREADS (torchrun's), else cores / processes
    if threads:
        logger.info(threads)
    # rank 0 first, so that a download happens once; a failure on any rank ends every rank with its message
    loaded = main_first(ctx, functools.partial(load_for_sampling, config, ctx.device, "ema"))
    folder = prepare_sample_folder(ctx, sample_dir, config, loaded.settings, logger)
    if config.likelihood is not None:
        evaluate_likelihood(ctx, config, loaded, folder, logger)
        return
    write_missing_images(ctx, config, loaded, folder, logger)
    barrier()  # every PNG is written before rank 0 reads them
    on_main(ctx, lambda: finish_npz(folder, config.num_images, logger, sampled_labels(config, loaded)))


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, config = parse_args(argv)
    setup_torch(config.precision)
    ctx = setup_distributed()
    try:
        run(ctx, config, args.sample_dir)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(run_main(main, "sample_ddp.py"))
