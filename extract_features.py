"""Encode an image folder once with the VAE, for training from cached latents (train.py --feature-path).

    torchrun --nnodes=1 --nproc_per_node=N extract_features.py --data-path /imagenet/train --features-path features/in256

Stores the VAE posterior of every image and its flip in resumable blocks (the same command continues),
then the latents' per-channel statistics (--latent-norm per-channel); --repa-encoder NAME also stores
that encoder's patch tokens. Format: sit/data/features.py.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Optional, Sequence

from sit.cli import ScriptParser, exit_process, non_negative_int, positive_int, run_main
from sit.data.extraction import (ExtractionConfig, check_features_path, discard_unstarted_folder, encode_blocks,
                                 feature_blocks, is_block_done, mark_complete, measure_blocks, open_image_folder,
                                 open_feature_folder)
from sit.data.features import read_meta
from sit.data.images import TrainImageFolder
from sit.distributed import DistContext, agree, cleanup_distributed, on_main, reduce_numbers, setup_distributed
from sit.encoders import canonical_encoder_name, load_encoder
from sit.generation import blocks_of_rank
from sit.latents import canonical_latent_space_name, load_latent_space
from sit.latents.statistics import ChannelMoments
from sit.locks import folder_locks_released, holds_folder_lock
from sit.speed import configure_cpu_threads


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (argparse's own errors: one line, exit 2)."""
    parser = ScriptParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--data-path", type=str, required=True, help="an ImageFolder (one sub-folder per class)")
    parser.add_argument("--features-path", type=str, required=True, help="output folder")
    parser.add_argument("--image-size", type=positive_int, default=256,
                        help="the ADM center crop's size (a multiple of the latent space's downsampling)")
    parser.add_argument("--vae", type=str, default="ema",
                        help="a latent space of sit.latents: ema, mse, another table entry or a local diffusers folder")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per process per VAE call")
    parser.add_argument("--block-size", type=positive_int, default=1024, help="images per resumable block")
    parser.add_argument("--num-workers", type=non_negative_int, default=4, help="image decoding processes")
    parser.add_argument("--float32", action="store_true", help="store float32 instead of float16")
    parser.add_argument("--repa-encoder", dest="token_encoder", type=str, default=None,
                        help="also store this encoder's patch tokens (train.py --repa-encoder's names)")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ExtractionConfig:
    """The run's configuration; a local --vae folder as an absolute path (meta.json names it wherever training runs)."""
    return ExtractionConfig(data_path=args.data_path, features_path=args.features_path, image_size=args.image_size,
                            vae=canonical_latent_space_name(args.vae), batch_size=args.batch_size,
                            block_size=args.block_size, num_workers=args.num_workers, float32=args.float32,
                            token_encoder=canonical_encoder_name(args.token_encoder))


def encode_missing_blocks(ctx: DistContext, config: ExtractionConfig, dataset: TrainImageFolder) -> None:
    """Every rank: lock and open the folder (rank 0), encode this rank's missing blocks, mark completeness."""
    if ctx.is_main and dataset.listing_warning:
        print(f"warning: {dataset.listing_warning}", file=sys.stderr, flush=True)
    on_main(ctx, functools.partial(open_feature_folder, config, dataset))
    meta = read_meta(config.features_path)
    space = agree(ctx, functools.partial(load_latent_space, config.vae, ctx.device))
    encoder = None if config.token_encoder is None else agree(
        ctx, functools.partial(load_encoder, config.token_encoder, config.image_size, ctx.device))
    blocks = blocks_of_rank(feature_blocks(meta), ctx.rank, ctx.world_size)
    todo = [block for block in blocks if not is_block_done(config.features_path, block)]
    if ctx.is_main:  # the block total is rank 0's share times the ranks (the message as it was)
        print(f"Encoding {meta['num_images']:,} images in {len(blocks) * ctx.world_size} blocks; "
              f"{len(blocks) - len(todo)} of this rank's {len(blocks)} blocks already done.")
    agree(ctx, functools.partial(encode_blocks, config, dataset, space, meta, todo, ctx.device, ctx.is_main, encoder))
    moments = agree(ctx, functools.partial(measure_blocks, config.features_path, meta, blocks))  # this rank's blocks
    channels = meta["latent_shape"][0]
    statistics = ChannelMoments.from_flat(reduce_numbers(moments.flat(), ctx.device), channels).statistics()
    complete = on_main(ctx, functools.partial(mark_complete, config.features_path, meta, statistics))
    if ctx.is_main:
        print(f"Features {'complete' if complete else 'INCOMPLETE'} in {config.features_path}")
        print(f"Latent statistics per channel: mean {[round(v, 4) for v in statistics.mean]}, "
              f"std {[round(v, 4) for v in statistics.std]}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Encode this rank's blocks of --data-path not done yet, then mark the folder complete; a run that
    fails before its first block removes the folder it created."""
    config = config_from_args(parse_args(argv))
    check_features_path(config.features_path)
    dataset = open_image_folder(config)  # before joining the job: a bad folder stops every rank alike
    created = not os.path.exists(config.features_path)
    ctx = setup_distributed()
    threads = configure_cpu_threads(ctx.device)  # on a CPU: OMP_NUM_THREADS (torchrun's), else cores / processes
    if threads and ctx.is_main:
        print(threads)
    try:
        with folder_locks_released():
            try:
                encode_missing_blocks(ctx, config, dataset)
            except BaseException:
                # only under our lock: a run that was refused it must not remove the folder of the run
                # that created it meanwhile (between the check of `created` and the lock)
                if created and ctx.is_main and holds_folder_lock(config.features_path):
                    discard_unstarted_folder(config.features_path)
                raise
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    exit_process(run_main(main, "extract_features.py"))
