"""Writing a folder of cached latents (sit.data.features): its meta.json, the check that an existing folder
is this run's, the encoding of its blocks (each marked done, so a rerun continues), and at the end the
per-channel statistics measured from the stored arrays with the mark that it is complete."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from sit.data.features import block_marker, has_tokens, open_arrays, open_token_array, read_meta, write_meta
from sit.data.images import TrainImageFolder
from sit.encoders import VisionEncoder, describe_encoder
from sit.errors import UsageError
from sit.files import atomic_text, folder_problem, remove_temporaries
from sit.latents import LatentSpace, latent_space
from sit.latents.statistics import ChannelMoments, LatentStatistics
from sit.locks import acquire_folder_lock
from sit.generation import index_blocks

# Settings that make a feature folder what it is: a rerun must agree on them.
IDENTITY_KEYS = ("image_size", "vae", "num_images", "classes", "dtype", "block_size", "repa_encoder")
# What a killed run may leave behind: atomic_text's temporaries in done/, atomic_json's beside meta.json.
TEMPORARY_SUFFIXES = {"done": ".txt", ".": ".json"}


@dataclass(frozen=True)
class ExtractionConfig:
    """What extract_features.py encodes, where to, and how (its flags' defaults)."""
    data_path: str  # an ImageFolder, as train.py --data-path
    features_path: str  # the output folder
    image_size: int = 256
    vae: str = "ema"  # a latent space of sit.latents (not pixels), canonical (canonical_latent_space_name)
    batch_size: int = 32  # images per process per VAE call
    block_size: int = 1024  # images per resumable block
    num_workers: int = 4
    float32: bool = False  # store float32 instead of float16
    token_encoder: Optional[str] = None  # also store this encoder's patch tokens (canonical, sit.encoders)

    @property
    def dtype(self) -> str:
        return "float32" if self.float32 else "float16"


def check_features_path(path: str) -> None:
    """UsageError when --features-path cannot be the output folder (a file, or not creatable)."""
    problem = folder_problem(path)
    if problem:
        raise UsageError(f"--features-path {path}: {problem}; name a folder you can write (it is created if missing)")


def discard_unstarted_folder(features_path: str) -> None:
    """Remove a feature folder that holds no finished block."""
    done = os.path.join(features_path, "done")
    if not (os.path.isdir(done) and any(name.endswith(".ok") for name in os.listdir(done))):
        shutil.rmtree(features_path, ignore_errors=True)


def open_image_folder(config: ExtractionConfig) -> TrainImageFolder:
    """The images in train.py --data-path's order, unflipped; UsageError unless --vae names a latent space
    (not pixels) whose downsampling divides --image-size."""
    space = latent_space(config.vae, allow_pixels=False)  # before any folder is made: features are VAE latents
    space.check_image_size(config.image_size)
    if config.token_encoder is not None:
        describe_encoder(config.token_encoder).input_size(config.image_size)
    return TrainImageFolder(config.data_path, config.image_size, random_flip=False)


def build_meta(config: ExtractionConfig, dataset: TrainImageFolder) -> dict:
    """meta.json's contents for this run (not yet complete); latent_shape: (C, L, L) of an image."""
    space = latent_space(config.vae, allow_pixels=False)  # not loaded: its geometry
    side = space.input_size(config.image_size)
    meta = dict(image_size=config.image_size, vae=config.vae, num_images=len(dataset), classes=dataset.classes,
                dtype=config.dtype, block_size=config.block_size, latent_shape=[space.channels, side, side],
                data_path=os.path.abspath(config.data_path), complete=False)
    if config.token_encoder is not None:  # only then: a folder without tokens keeps its old meta.json
        spec = describe_encoder(config.token_encoder)
        side = spec.input_size(config.image_size) // spec.patch_size
        meta.update({"repa_encoder": spec.source, "repa_tokens_shape": [side * side, spec.embed_dim]})
    return meta


def open_feature_folder(config: ExtractionConfig, dataset: TrainImageFolder) -> dict:
    """Lock the folder, check that an existing one holds this run's features (else UsageError naming
    --features-path), or create it, its arrays and meta.json; returns its meta (one rank's job)."""
    meta = build_meta(config, dataset)
    os.makedirs(config.features_path, exist_ok=True)
    acquire_folder_lock(config.features_path, "the feature folder", warn=print)  # one writer (sit.locks)
    existing = read_meta(config.features_path)
    if existing is None:
        os.makedirs(os.path.join(config.features_path, "done"), exist_ok=True)
        open_arrays(config.features_path, meta, "w+")
        if has_tokens(meta):
            open_token_array(config.features_path, meta, "w+")
        write_meta(config.features_path, meta)
        return meta
    if existing.get("data_path") not in (None, meta["data_path"]):
        raise UsageError(f"{config.features_path} holds features of {existing['data_path']}, not of --data-path "
                         f"{meta['data_path']}; choose another --features-path")
    different = [key for key in IDENTITY_KEYS if existing.get(key) != meta.get(key)]
    if different:
        raise UsageError(f"{config.features_path} holds features made with other settings "
                         f"({', '.join(different)}); choose another --features-path")
    for folder, suffix in TEMPORARY_SUFFIXES.items():
        remove_temporaries(os.path.join(config.features_path, folder), suffix)
    return existing


def feature_blocks(meta: dict) -> list[range]:
    """The folder's blocks of image indices, in order (the last may be shorter)."""
    return index_blocks(meta["num_images"], meta["block_size"])


def is_block_done(features_path: str, block: range) -> bool:
    return os.path.exists(block_marker(features_path, block.start))


@torch.no_grad()
def encode_block(space: LatentSpace, loader: DataLoader, device: torch.device,
                 encoder: Optional[VisionEncoder] = None) -> tuple[np.ndarray, ...]:
    """The raw posterior mean and std (space.posterior) of each image and its flip: (n, 2, C, h, w) each,
    labels (n,), and with an encoder its patch tokens of both (n, 2, T, D) (else None)."""
    means, stds, labels, tokens = [], [], [], []
    for images, targets in loader:
        images = images.to(device)                                   # (B, 3, H, W)
        both = torch.cat([images, images.flip(dims=[3])], dim=0)     # (2B, 3, H, W)
        mean, std = space.posterior(both)                            # (2B, C, h, w) each
        batch = images.shape[0]
        means.append(torch.stack(mean.split(batch), dim=1).cpu())    # (B, 2, C, h, w)
        stds.append(torch.stack(std.split(batch), dim=1).cpu())      # (B, 2, C, h, w)
        labels.append(targets)
        if encoder is not None:
            tokens.append(torch.stack(encoder.patch_tokens(both).split(batch), dim=1).cpu())  # (B, 2, T, D)
    return (torch.cat(means).numpy(), torch.cat(stds).numpy(), torch.cat(labels).numpy(),
            torch.cat(tokens).numpy() if tokens else None)


def encode_blocks(config: ExtractionConfig, dataset: TrainImageFolder, space: LatentSpace, meta: dict,
                  blocks: list[range], device: torch.device, show_progress: bool = True,
                  encoder: Optional[VisionEncoder] = None) -> None:
    """Encode these blocks into the folder's arrays (and tokens), each flushed, then marked done."""
    arrays = list(open_arrays(config.features_path, meta, "r+"))
    if encoder is not None:
        arrays.append(open_token_array(config.features_path, meta, "r+"))
    for block in tqdm(blocks, desc="blocks", disable=not show_progress):
        loader = DataLoader(Subset(dataset, block), batch_size=config.batch_size, num_workers=config.num_workers,
                            pin_memory=device.type == "cuda")
        encoded = encode_block(space, loader, device, encoder)
        for array, values in zip(arrays, encoded):  # mean, std, labels[, tokens]
            array[block.start:block.stop] = values
            array.flush()
        atomic_text(block_marker(config.features_path, block.start), f"{len(block)}\n")


def measure_blocks(features_path: str, meta: dict, blocks: list[range]) -> ChannelMoments:
    """The float64 moment sums of these blocks' stored posteriors (their values as stored, float16 or float32)."""
    mean, std, _ = open_arrays(features_path, meta, "r")
    moments = ChannelMoments(meta["latent_shape"][0])
    for block in blocks:
        moments.add(mean[block.start:block.stop], std[block.start:block.stop])  # (n, 2, C, h, w) each
    return moments


def mark_complete(features_path: str, meta: dict, statistics: Optional[LatentStatistics] = None) -> bool:
    """Record in meta.json whether every block is done (then the statistics); returns completeness."""
    complete = all(is_block_done(features_path, block) for block in feature_blocks(meta))
    stored = {key: value for key, value in meta.items() if key != "latent_statistics"}
    if complete and statistics is not None:
        stored["latent_statistics"] = statistics.to_dict()
    write_meta(features_path, {**stored, "complete": complete})
    return complete
