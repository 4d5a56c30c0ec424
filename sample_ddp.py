"""Sample many images from a SiT with one or more processes, for FID and other metrics; or evaluate
log-likelihoods (--likelihood). See docs/sampling.md and docs/evaluation.md.

    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py ODE --model SiT-XL/2 --num-fid-samples 50000
    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py ODE --likelihood --data-path /path/to/imagenet/val
    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py --preset sit-xl2-256-ode-cfg1.5   # --preset list

Images go to <sample-dir>/<folder>/000000.png ..., then <folder>.npz (arr_0: uint8 (N, H, W, 3); labels:
(N,) int64) and its record <folder>.json; image i is seeded by (global seed, i), whatever the process count.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from typing import Optional, Sequence

from sit.cli import exit_process, non_negative_int, parse_with_explicit, positive_int, run_main
from sit.distributed import (DistContext, barrier, cleanup_distributed, gather_objects, main_first, on_main,
                             setup_distributed)
from sit.generation import LABEL_SAMPLINGS
from sit.locks import folder_locks_released
from sit.log import create_logger
from sit.sampling.batch_record import build_record, claim_sample_folder, finish_sample_batch
from sit.sampling.flags import add_likelihood_arguments, sampling_mode, sampling_parser
from sit.sampling.folder import open_sample_folder, removed_if_left_empty
from sit.sampling.images import sampled_labels, write_missing_images
from sit.sampling.likelihood import evaluate_likelihood
from sit.sampling.loading import load_for_sampling, setup_torch
from sit.sampling.presets import (LIST_PRESETS, PresetUse, apply_preset, preset_names, preset_table, requested_preset,
                                  with_preset_mode)
from sit.sampling.settings import SamplingConfig, sampling_config
from sit.speed import configure_cpu_threads, precision_advice


def add_ddp_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-dir", type=str, default="samples",
                        help="where the sample folder (named after the settings), its .npz and record go")
    parser.add_argument("--per-proc-batch-size", type=positive_int, default=4,
                        help="images per model call on each process (the images do not depend on it)")
    parser.add_argument("--num-fid-samples", type=positive_int, default=50_000,
                        help="number of images to sample (with --likelihood: to evaluate)")
    parser.add_argument("--global-seed", type=non_negative_int, default=0,
                        help="seeds every image's noise and label (image i's own seed derives from it)")
    parser.add_argument("--label-sampling", choices=LABEL_SAMPLINGS, default="random",
                        help="random: each image's class drawn uniformly, seeded by its index (the original's); "
                             "balanced: exactly N / num_classes images of every class (N = --num-fid-samples, a "
                             "multiple), in a seeded order; both independent of the number of processes")
    parser.add_argument("--preset", choices=preset_names(), default=None,
                        help="fill the flags of a published evaluation, its mode too (explicit flags win, with a "
                             "warning); `--preset list` shows them with their published numbers and sources")
    add_likelihood_arguments(parser)


def build_parser(mode: Optional[str]) -> argparse.ArgumentParser:
    return sampling_parser(mode, description="Sample many images from a SiT (DDP), or evaluate log-likelihoods.",
                           vae_default="ema", cfg_default=1.0, add_script_arguments=add_ddp_arguments)


def parse_command_line(argv: Optional[Sequence[str]] = None
                       ) -> tuple[argparse.Namespace, SamplingConfig, Optional[PresetUse]]:
    """The flags, their SamplingConfig (with a --preset's flags filled in) and the preset's use; UsageError
    (or argparse's exit 2) for a bad command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    preset_name = requested_preset(argv)
    argv = with_preset_mode(argv, preset_name)
    mode = sampling_mode(argv)
    parser_of_mode = functools.partial(build_parser, mode)
    args, given = parse_with_explicit(parser_of_mode, argv)
    flags, preset = vars(args), None
    if preset_name is not None:  # merged into a copy: the Namespace stays as parsed
        preset = apply_preset(preset_name, flags, given, parser_of_mode)
        flags, given = preset.flags, preset.given
    with contextlib.nullcontext() if preset is None else preset.blamed():
        config = sampling_config(flags, given, seed=flags["global_seed"], num_images=flags["num_fid_samples"],
                                 batch_size=flags["per_proc_batch_size"])
    return args, config, preset


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, SamplingConfig]:
    """The flags and their SamplingConfig (see parse_command_line)."""
    return parse_command_line(argv)[:2]


def run(ctx: DistContext, config: SamplingConfig, sample_dir: str, preset: Optional[PresetUse] = None) -> None:
    """Sample the missing images and build the .npz and its record, or evaluate the likelihoods (every rank)."""
    logger = create_logger(None, ctx.is_main)
    logger.info(f"Starting rank={ctx.rank}, world_size={ctx.world_size}, device={ctx.device}")
    threads = configure_cpu_threads(ctx.device)  # on a CPU: OMP_NUM_THREADS (torchrun's), else cores / processes
    if threads:
        logger.info(threads)
        logger.info(precision_advice(config.precision, ctx.device))  # the CPU's bf16 units, measured
    if preset is not None:
        logger.info(preset.summary())
        for warning in preset.warnings():
            logger.warning(warning)
    for warning in config.warnings:
        logger.warning(f"warning: {warning}")
    # rank 0 first, so that a download happens once; a failure on any rank ends every rank with its message
    loaded = main_first(ctx, functools.partial(load_for_sampling, config, ctx.device, "ema"))
    sample_dir_existed = os.path.isdir(sample_dir)
    folder = open_sample_folder(ctx, sample_dir, config, loaded.settings, logger)
    with removed_if_left_empty(ctx, folder, sample_dir_existed):  # a failed run leaves no empty folder
        if config.likelihood is not None:
            evaluate_likelihood(ctx, config, loaded, folder, logger)
            return
        sources = on_main(ctx, functools.partial(claim_sample_folder, config, loaded, folder, logger))
        per_rank_nfe = gather_objects(write_missing_images(ctx, config, loaded, folder, logger))
        barrier()  # every PNG is written before rank 0 reads them
        make_record = functools.partial(build_record, config, loaded, sources, per_rank_nfe, ctx.world_size,
                                        None if preset is None else preset.name)
        on_main(ctx, lambda: finish_sample_batch(folder, config.num_images, make_record, logger,
                                                 sampled_labels(config, loaded)))  # labels: rank 0 draws them


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if requested_preset(argv) == LIST_PRESETS:
        print(preset_table())
        return
    args, config, preset = parse_command_line(argv)
    setup_torch(config.precision)
    ctx = setup_distributed()
    try:
        with folder_locks_released(), contextlib.nullcontext() if preset is None else preset.blamed():
            run(ctx, config, args.sample_dir, preset)  # the sample folder's lock (sit.locks) is rank 0's
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    exit_process(run_main(main, "sample_ddp.py"))
