"""Sample a grid of images from a SiT: the published SiT-XL/2 (downloaded) or a train.py checkpoint.

    python sample.py ODE --image-size 256 --seed 1
    python sample.py SDE --ckpt results/000-SiT-B-2/checkpoints/0100000.pt --class-labels 1,2,3

For many images (FID) or likelihoods, see sample_ddp.py.
"""
from __future__ import annotations

import argparse
import functools
import os
from time import time
from typing import Optional, Sequence

import torch
from PIL import Image
from torchvision.utils import save_image

import sampling
from models import has_null_class
from train_utils import atomic_write, create_logger, positive_int, setup_distributed

# Labels to condition the model with (the original's; change with --class-labels)
DEFAULT_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


def class_label_list(value: str) -> list[int]:
    """argparse type: comma-separated non-negative integers, e.g. 1,2,3."""
    try:
        labels = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3, got {value!r}")
    if not labels or min(labels) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers such as 1,2,3, got {value!r}")
    return labels


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-labels", type=class_label_list, default=None,
                        help=f"comma-separated class labels (default: {','.join(map(str, DEFAULT_CLASS_LABELS))})")
    parser.add_argument("--num-images", type=positive_int, default=None,
                        help="number of images; the labels repeat to fill them (default: one per label)")
    parser.add_argument("--output", type=str, default="sample.png", help="where to save the grid (4 columns)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser, args = sampling.parse_sampling_args(
        argv, description="Sample a grid of images from a SiT.", vae_default="mse", cfg_default=4.0,
        add_script_arguments=add_sample_arguments,
        likelihood_hint="--likelihood is evaluated by sample_ddp.py (e.g. `sample_ddp.py ODE --likelihood "
                        "--data-path DIR`), which reports NLL and bits/dim and saves per-image values")
    problem = output_problem(args.output)
    if problem:
        parser.error(f"--output {args.output!r}: {problem}")
    return args


def output_problem(path: str) -> Optional[str]:
    """Why the grid could not be saved at `path` (None if it can), checked before any sampling:
    an extension PIL cannot write, or a folder that neither exists nor can be created writable."""
    extension = os.path.splitext(path)[1].lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        return f"needs an image extension that PIL can write, such as .png or .jpg (got {extension or 'none'})"
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):  # the nearest folder that exists: the rest gets created in it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write in {existing}"
    return None


def labels_for(args: argparse.Namespace) -> list[int]:
    """The class labels of the images: --class-labels or the original's 8, repeated to --num-images."""
    labels = args.class_labels or DEFAULT_CLASS_LABELS
    out_of_range = [label for label in labels if label >= args.num_classes]
    if out_of_range:
        hint = "" if args.class_labels else " (the default labels are ImageNet's): pass --class-labels"
        raise SystemExit(f"error: class labels {out_of_range} are out of range for a model with "
                         f"{args.num_classes} classes (0..{args.num_classes - 1}){hint}")
    count = args.num_images or len(labels)
    return [labels[i % len(labels)] for i in range(count)]


def save_grid(images: torch.Tensor, path: str) -> None:
    """Save images (N, 3, H, W) in [-1, 1] as a 4-column grid, via a temporary file and a rename."""
    write = functools.partial(save_image, images, nrow=4, normalize=True, value_range=(-1, 1))
    atomic_write(path, write, suffix=os.path.splitext(path)[1])  # the format follows the extension


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    # As the original: seeded first, so that z follows the same draws (on the CPU, the model's and the
    # VAE's initialisation come before z; on a GPU, z is the first draw of its generator).
    torch.manual_seed(args.seed)
    sampling.setup_torch(args.precision)
    device = setup_distributed().device  # a single plain process: cuda:0 if there is a GPU, else the CPU
    logger = create_logger(None)

    model, info = sampling.load_model_from_args(args, device)
    labels = labels_for(args)
    vae = sampling.load_decoder(sampling.vae_name_from_args(args, info, default="mse"), device)
    sample_fn = sampling.sample_fn_for_args(args)
    logger.info(f"{args.model} ({args.ckpt or 'published'}), {args.image_size}px, {args.mode} "
                f"{args.sampling_method}, {args.num_sampling_steps} steps, cfg {args.cfg_scale}, "
                f"{args.path_type}/{args.prediction}")

    latent_size = model.config["input_size"]
    z = torch.randn(len(labels), model.in_channels, latent_size, latent_size, device=device)
    y = torch.tensor(labels, device=device)

    start_time = time()
    # As the original sample.py: the doubled, guided batch even at --cfg-scale 1 (same numbers for a seed);
    # a model without a null class (no label dropout; the original would fail) samples unguided.
    latents = sampling.generate_latents(sample_fn, model, z, y, args, always_guide=has_null_class(model.config))
    images = sampling.decode_latents(vae, latents, args.precision)
    logger.info(f"Sampling took {time() - start_time:.2f} seconds, {sample_fn.nfe} model evaluations.")

    save_grid(images, args.output)
    logger.info(f"Saved {len(labels)} images (labels {labels}) to {args.output}")


if __name__ == "__main__":
    main()
