"""Encode an image folder once with the VAE, for training from cached latents (train.py --feature-path).

    torchrun --nnodes=1 --nproc_per_node=N extract_features.py --data-path /imagenet/train --features-path features/in256

Stores the VAE posterior (mean and std) of every image and of its horizontal flip, in blocks; a run
that stops can be started again with the same command and continues with the missing blocks.
See features.py for the format.
"""
from __future__ import annotations

import argparse
import os
from typing import NoReturn

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from features import block_marker, open_arrays, read_meta, write_meta
from train_utils import (VAE_REPOS, TrainImageFolder, barrier, cleanup_distributed, load_vae, non_negative_int,
                         positive_int, setup_distributed)

# Settings that make a feature folder what it is: a rerun must agree on them.
IDENTITY_KEYS = ("image_size", "vae", "num_images", "classes", "dtype", "block_size")


def fail(message: str) -> NoReturn:
    """End with a one-line message (printed once: by rank 0, or by the single process)."""
    if os.environ.get("RANK", "0") == "0":
        raise SystemExit(f"extract_features.py: error: {message}")
    raise SystemExit(1)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; a local --vae folder becomes an absolute path (meta.json names it wherever training runs)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", type=str, required=True, help="an ImageFolder (one sub-folder per class)")
    parser.add_argument("--features-path", type=str, required=True, help="output folder")
    parser.add_argument("--image-size", type=positive_int, default=256)
    parser.add_argument("--vae", type=str, default="ema", help="ema, mse or a local diffusers AutoencoderKL folder")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per process per VAE call")
    parser.add_argument("--block-size", type=positive_int, default=1024, help="images per resumable block")
    parser.add_argument("--num-workers", type=non_negative_int, default=4)
    parser.add_argument("--float32", action="store_true", help="store float32 instead of float16")
    args = parser.parse_args(argv)
    if args.image_size % 8:
        parser.error(f"--image-size must be a multiple of 8 (the VAE downsamples by 8), got {args.image_size}")
    if not os.path.isdir(args.data_path):
        parser.error(f"--data-path {args.data_path} is not a folder")
    if args.vae not in VAE_REPOS and os.path.isdir(args.vae):
        args.vae = os.path.abspath(args.vae)
    return args


def open_images(args: argparse.Namespace) -> TrainImageFolder:
    """The images in train.py --data-path's order, unflipped (train.py's listing: one-line errors for a
    folder without class folders or images; an unreadable image is skipped with a warning, as in training)."""
    try:
        return TrainImageFolder(args.data_path, args.image_size, random_flip=False)
    except ValueError as error:
        fail(str(error))


def build_meta(args: argparse.Namespace, dataset: TrainImageFolder) -> dict:
    """meta.json's contents for this run (not yet complete)."""
    latent = args.image_size // 8
    return dict(image_size=args.image_size, vae=args.vae, num_images=len(dataset), classes=dataset.classes,
                dtype="float32" if args.float32 else "float16", block_size=args.block_size,
                latent_shape=[4, latent, latent], data_path=os.path.abspath(args.data_path), complete=False)


def prepare_folder(args: argparse.Namespace, dataset: TrainImageFolder, is_main: bool) -> dict:
    """Create the folder and arrays (rank 0), or check that an existing one matches this run."""
    meta = build_meta(args, dataset)
    existing = read_meta(args.features_path)
    if existing is not None:
        if existing.get("data_path") not in (None, meta["data_path"]):
            fail(f"{args.features_path} holds features of {existing['data_path']}, not of --data-path "
                 f"{meta['data_path']}; choose another --features-path")
        different = [key for key in IDENTITY_KEYS if existing.get(key) != meta[key]]
        if different:
            fail(f"{args.features_path} holds features made with other settings "
                 f"({', '.join(different)}); choose another --features-path")
        return existing
    if is_main:
        os.makedirs(os.path.join(args.features_path, "done"), exist_ok=True)
        open_arrays(args.features_path, meta, "w+")
        write_meta(args.features_path, meta)
    return meta


@torch.no_grad()
def encode_block(vae, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Posterior mean and std of each image and its flip: (n, 2, C, h, w) each, and labels (n,)."""
    means, stds, labels = [], [], []
    for images, targets in loader:
        images = images.to(device)                                   # (B, 3, H, W)
        both = torch.cat([images, images.flip(dims=[3])], dim=0)     # (2B, 3, H, W)
        posterior = vae.encode(both).latent_dist
        batch = images.shape[0]
        means.append(torch.stack(posterior.mean.split(batch), dim=1).cpu())  # (B, 2, C, h, w)
        stds.append(torch.stack(posterior.std.split(batch), dim=1).cpu())
        labels.append(targets)
    return torch.cat(means).numpy(), torch.cat(stds).numpy(), torch.cat(labels).numpy()


def main(args: argparse.Namespace) -> None:
    """Encode the blocks of --data-path not done yet (this rank's share), then mark the folder complete."""
    dataset = open_images(args)  # before joining the job: a bad folder stops every rank alike
    ctx = setup_distributed()
    meta = prepare_folder(args, dataset, ctx.is_main)
    barrier()
    meta = read_meta(args.features_path)
    vae = load_vae(args.vae, ctx.device)
    mean_array, std_array, label_array = open_arrays(args.features_path, meta, "r+")
    starts = list(range(0, meta["num_images"], meta["block_size"]))[ctx.rank::ctx.world_size]
    todo = [start for start in starts if not os.path.exists(block_marker(args.features_path, start))]
    if ctx.is_main:
        print(f"Encoding {meta['num_images']:,} images in {len(starts) * ctx.world_size} blocks; "
              f"{len(starts) - len(todo)} of this rank's {len(starts)} blocks already done.")
    for start in tqdm(todo, desc="blocks", disable=not ctx.is_main):
        stop = min(start + meta["block_size"], meta["num_images"])
        loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=args.batch_size,
                            num_workers=args.num_workers, pin_memory=ctx.device.type == "cuda")
        means, stds, labels = encode_block(vae, loader, ctx.device)
        mean_array[start:stop], std_array[start:stop], label_array[start:stop] = means, stds, labels
        for array in (mean_array, std_array, label_array):
            array.flush()
        with open(block_marker(args.features_path, start), "w") as handle:
            handle.write(f"{stop - start}\n")
    barrier()
    if ctx.is_main:
        all_starts = range(0, meta["num_images"], meta["block_size"])
        meta["complete"] = all(os.path.exists(block_marker(args.features_path, start)) for start in all_starts)
        write_meta(args.features_path, meta)
        print(f"Features {'complete' if meta['complete'] else 'INCOMPLETE'} in {args.features_path}")
    cleanup_distributed()


if __name__ == "__main__":
    main(parse_args())
