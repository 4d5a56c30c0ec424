"""Sample a grid of images from a SiT: the published SiT-XL/2 (downloaded) or a train.py checkpoint.

    python sample.py ODE --image-size 256 --seed 1
    python sample.py SDE --ckpt results/000-SiT-B-2/checkpoints/0100000.pt --class-labels 1,2,3

For many images (FID) or likelihoods, see sample_ddp.py.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from time import time
from typing import Optional, Sequence

import torch
from PIL import Image

from models import has_null_class
from sit.cli import class_label_list, parse_with_explicit, positive_int, run_main
from sit.config import build_sample_fn
from sit.distributed import setup_distributed
from sit.errors import UsageError
from sit.files import folder_problem
from sit.generation import ObservedSampleFunction, generate_latents
from sit.grid import GridLayout, label_rows, labels_path, save_grid, save_labels
from sit.latents import as_latent_space, latent_shape
from sit.log import create_logger
from sit.progress import SamplerProgress
from sit.sampling.flags import sampling_mode, sampling_parser
from sit.sampling.loading import load_decoder, load_sampling_model, setup_torch
from sit.sampling.settings import SamplingConfig, sampling_config
from sit.speed import configure_cpu_threads, precision_advice

# Labels to condition the model with (the original's; change with --class-labels)
DEFAULT_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]
GRID_COLUMNS = 4  # the original's grid of the default labels
LIKELIHOOD_REFUSAL = ("--likelihood is evaluated by sample_ddp.py (e.g. `sample_ddp.py ODE --likelihood --data-path "
                      "DIR`), which reports NLL and bits/dim and saves per-image values")


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seeds the images' noise")
    parser.add_argument("--class-labels", type=class_label_list, default=None,
                        help=f"comma-separated class labels (default: {','.join(map(str, DEFAULT_CLASS_LABELS))})")
    parser.add_argument("--num-images", type=positive_int, default=None,
                        help="number of images; the labels repeat to fill them (default: one per label)")
    parser.add_argument("--output", type=str, default="sample.png",
                        help="where to save the grid (4 columns), its labels beside it (<name>.labels.txt)")
    parser.add_argument("--one-row-per-label", action="store_true",
                        help="one grid row per label of --class-labels, e.g. 0,...,9 with --num-images 40: 10 rows of 4")


def build_parser(mode: Optional[str]) -> argparse.ArgumentParser:
    return sampling_parser(mode, description="Sample a grid of images from a SiT.", vae_default="mse",
                           cfg_default=4.0, add_script_arguments=add_sample_arguments)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, SamplingConfig]:
    """The flags and their SamplingConfig; UsageError (or argparse's exit 2) for a bad command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = sampling_mode(argv)
    args, given = parse_with_explicit(functools.partial(build_parser, mode), argv)
    count = args.num_images or len(args.class_labels or DEFAULT_CLASS_LABELS)
    config = sampling_config(vars(args), given, seed=args.seed, num_images=count, batch_size=count,
                             likelihood_refusal=LIKELIHOOD_REFUSAL)
    problem = output_problem(args.output)
    if problem:
        raise UsageError(f"--output {args.output!r}: {problem}")
    return args, config


def output_problem(path: str) -> Optional[str]:
    """Why the grid could not be saved at `path` (None if it can), checked before any sampling:
    an extension PIL cannot write, or a folder that neither exists nor can be created writable."""
    if os.path.isdir(path):
        return "is a folder; name the image file to write, e.g. grid.png"
    extension = os.path.splitext(path)[1].lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        return f"needs an image extension that PIL can write, such as .png or .jpg (got {extension or 'none'})"
    return folder_problem(os.path.dirname(os.path.abspath(path)))


def labels_for(class_labels: Optional[list[int]], num_images: int, num_classes: int) -> list[int]:
    """The class labels of the images: --class-labels or the original's 8, repeated to num_images."""
    labels = class_labels or DEFAULT_CLASS_LABELS
    out_of_range = [label for label in labels if label >= num_classes]
    if out_of_range:
        which = "--class-labels" if class_labels else "the default class labels (ImageNet's)"
        hint = "" if class_labels else ": pass --class-labels"
        raise UsageError(f"{which} {out_of_range} are out of range for a model with "
                         f"{num_classes} classes (0..{num_classes - 1}){hint}")
    return [labels[i % len(labels)] for i in range(num_images)]


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, config = parse_args(argv)
    # As the original: seeded first, so that z follows the same draws (on the CPU, the model's and the
    # VAE's initialisation come before z; on a GPU, z is the first draw of its generator).
    torch.manual_seed(config.seed)
    setup_torch(config.precision)
    device = setup_distributed().device  # a single plain process: cuda:0 if there is a GPU, else the CPU
    logger = create_logger(None)
    threads = configure_cpu_threads(device)
    if threads:
        logger.info(threads)
        logger.info(precision_advice(config.precision, device))  # the CPU's bf16 units, measured
    for warning in config.warnings:
        logger.warning(f"warning: {warning}")

    model, settings = load_sampling_model(config, device, vae_default="mse")
    labels = labels_for(args.class_labels, config.num_images, settings.num_classes)
    space = as_latent_space(load_decoder(settings.vae, device, settings.latent_statistics))  # None: pixels
    sample_fn = build_sample_fn(settings.transport, config.sampler)
    sampler = config.sampler
    logger.info(f"{settings.name} ({settings.ckpt or 'published'}), {settings.image_size}px, {sampler.describe()}, "
                f"cfg {config.guidance.scale}, {settings.transport.path_type}/{settings.transport.prediction}"
                + (f", autoguided by {config.guidance.guide_ckpt}" if config.guidance.guide_ckpt else ""))

    z = torch.randn(len(labels), *latent_shape(model.config), device=device)  # (N, C, L, L)
    y = torch.tensor(labels, device=device)

    start_time = time()
    progress = SamplerProgress(reverse=getattr(sampler, "reverse", False))  # a bar, or a line every few seconds
    # As the original sample.py: the doubled, guided batch even at --cfg-scale 1 (same numbers for a seed);
    # a model without a null class (no label dropout; the original would fail) samples unguided.
    latents = generate_latents(ObservedSampleFunction(sample_fn, progress), model, z, y, config.guidance,
                               config.precision, always_guide=has_null_class(model.config))
    progress.close()
    images = space.decode(latents, config.precision)
    logger.info(f"Sampling took {time() - start_time:.2f} seconds: {sampler.evaluations(sample_fn.nfe)}.")

    # the original's 4 columns; --one-row-per-label: row r holds every image of the r-th label (they cycle)
    layout = (GridLayout.one_row_per_label(len(labels), len(args.class_labels or DEFAULT_CLASS_LABELS))
              if args.one_row_per_label else GridLayout.with_columns(len(labels), GRID_COLUMNS))
    save_grid(images, layout, args.output)
    labels_file = save_labels(labels, layout, labels_path(args.output))
    logger.info(f"Saved {len(labels)} images (labels {labels}) to {args.output}; by grid row (as in {labels_file}): "
                f"{' | '.join(label_rows(labels, layout))}")


if __name__ == "__main__":
    sys.exit(run_main(main, "sample.py"))
