"""sample_ddp.py's images: every missing PNG of a sample folder, written by all ranks together in fixed blocks
(sit.generation.generate_blocks), so the images do not depend on the process count and a rerun continues."""
from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from sit.background import BackgroundWriter, cpu_snapshot
from sit.config import build_sample_fn
from sit.distributed import DistContext, agree, reduce_numbers
from sit.generation import GeneratedBlock, blocks_of_rank, generate_blocks, image_labels, index_blocks, planned_labels
from sit.latents import latent_shape, uint8_hwc
from sit.sampling.folder import missing_indices, png_path, save_png
from sit.sampling.loading import SamplingModel
from sit.sampling.settings import SamplingConfig


def save_pngs(writes: list[tuple[np.ndarray, str]]) -> None:
    """Write each (pixels (H, W, 3) uint8, path) as a PNG, in order."""
    for pixels, path in writes:
        save_png(pixels, path)


def sample_block(generated: Iterator[GeneratedBlock], folder: str, sample_fn: Any, to_write: dict[int, list[int]],
                 measured: list[tuple[int, int]], writer: BackgroundWriter) -> int:
    """Sample the next block, then hand its PNGs listed in to_write (block start -> indices missing or
    damaged) to the writer once the previous block's are written (its failure fails this block); appends
    (PNGs written, model evaluations) to measured."""
    block = next(generated)
    wanted = set(to_write[block.indices[0]])
    pixels, ready = cpu_snapshot(uint8_hwc(block.images), pin=block.images.is_cuda)  # (n, H, W, 3) uint8
    writes = [(pixels[row].numpy(), png_path(folder, index)) for row, index in enumerate(block.indices)
              if index in wanted]
    writer.wait()
    writer.start(folder, functools.partial(save_pngs, writes), ready)
    measured.append((len(writes), sample_fn.nfe))  # .nfe: this batch's model evaluations
    return len(writes)


def write_missing_images(ctx: DistContext, config: SamplingConfig, loaded: SamplingModel, folder: str,
                         logger: Any) -> list[tuple[int, int]]:
    """Write every missing PNG of indices 0..num_images-1 into folder (every rank takes part); returns, for
    each block this rank sampled, (PNGs it wrote, model evaluations its batch took)."""
    settings = loaded.settings
    sample_fn = build_sample_fn(settings.transport, config.sampler)
    blocks = blocks_of_rank(index_blocks(config.num_images, config.batch_size), ctx.rank, ctx.world_size)
    # a PNG that is there but not a whole image of the right size (zero bytes, cut, foreign) is sampled again
    to_write = {block.start: missing_indices(folder, block, settings.image_size) for block in blocks}
    pending = [block for block in blocks if to_write[block.start]]
    missing_here = sum(len(to_write[block.start]) for block in pending)
    damaged = [index for block in pending for index in to_write[block.start] if os.path.exists(png_path(folder, index))]
    total_missing, total_damaged = reduce_numbers([missing_here, len(damaged)], ctx.device)
    (num_rounds,) = reduce_numbers([len(pending)], ctx.device, "max")
    if total_damaged:
        example = f", e.g. {png_path(folder, damaged[0])}" if damaged else ""
        logger.warning(f"warning: {int(total_damaged)} existing PNGs are not whole {settings.image_size}x"
                       f"{settings.image_size} RGB images (empty, cut or foreign{example}): sampling them again")
    logger.info(f"{config.num_images - int(total_missing)} of {config.num_images} images already exist; "
                f"sampling {int(total_missing)} on {ctx.world_size} process(es) with {config.sampler.describe()}")
    generated = generate_blocks(pending, loaded.model, loaded.vae, sample_fn, global_seed=config.seed,
                                num_classes=settings.num_classes, guidance=config.guidance,
                                precision=config.precision, device=ctx.device, stop_on_non_finite=True,
                                labels=planned_labels(config.label_sampling, config.num_images, config.seed,
                                                      settings.num_classes))
    times, done = [time.perf_counter()], [0]  # after each round: for the speed without the first (warm-up) round
    progress = tqdm(total=int(total_missing), unit="img", disable=not ctx.is_main, dynamic_ncols=True)
    measured: list[tuple[int, int]] = []
    writer = BackgroundWriter()  # a block's PNGs are written while the next block samples
    try:
        for round_index in range(int(num_rounds)):  # in lockstep, so rank 0 can count everyone's images
            round_of_rank = functools.partial(sample_block, generated, folder, sample_fn, to_write, measured, writer)
            # every rank learns any rank's failure (a full disk, non-finite samples) instead of waiting for it
            written = agree(ctx, round_of_rank if round_index < len(pending) else None) or 0
            (written_everywhere,) = reduce_numbers([written], ctx.device)
            progress.update(int(written_everywhere))
            times.append(time.perf_counter())
            done.append(done[-1] + int(written_everywhere))
        agree(ctx, writer.wait)  # the last block's PNGs
        times[-1] = time.perf_counter()
    except BaseException:
        with contextlib.suppress(Exception):  # its PNGs land; the failure being raised is the one to report
            writer.wait()
        raise
    progress.close()
    if total_missing:  # the script's own speed, end to end (benchmarks/device_check.py reads the warm one)
        warm = (f"; after the first batch (warm-up, compilation): {(done[-1] - done[1]) / (times[-1] - times[1]):.2f} "
                f"img/s" if len(times) > 2 else "")
        logger.info(f"Sampled {done[-1]} images in {times[-1] - times[0]:.1f} s: "
                    f"{done[-1] / (times[-1] - times[0]):.2f} img/s (model, VAE decode and PNGs, all processes){warm}")
    if sample_fn.nfe:
        logger.info(f"{config.sampler.evaluations(sample_fn.nfe)} per batch (last batch)")
    return measured


def sampled_labels(config: SamplingConfig, loaded: SamplingModel) -> np.ndarray:
    """The class label (num_images,) int64 each image of the folder was conditioned on (sit.generation's
    per-index draw, the one generate_blocks makes, or its balanced labels)."""
    planned = planned_labels(config.label_sampling, config.num_images, config.seed, loaded.settings.num_classes)
    if planned is not None:
        return planned
    return image_labels(config.num_images, config.seed, latent_shape(loaded.model.config), loaded.settings.num_classes)
