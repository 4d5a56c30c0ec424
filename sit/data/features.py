"""Cached VAE latents: the on-disk format extract_features.py writes and train.py --feature-path reads.

A feature folder holds, for N images of an ImageFolder (in its sorted order):
    meta.json              image size, VAE, N, classes, latent shape, dtype, block size, completeness
    mean.npy, std.npy      (N, 2, C, h, w) the VAE posterior's mean and std, [:, 0] for the image
                           and [:, 1] for its horizontal flip (unscaled, as the VAE returns them)
    labels.npy             (N,) int64 class indices
    repa_tokens.npy        only with extract_features.py --repa-encoder: (N, 2, T, D) the encoder's patch
                           tokens (sit.encoders) of the image and its flip; meta.json then names the
                           encoder ("repa_encoder") and the token shape ("repa_tokens_shape": [T, D])
    done/<start>.ok        one marker per finished block of `block_size` images
The arrays are memory-mapped, so a training step reads only the rows it needs. Training draws a
fresh latent (mean + std * noise) * LATENT_SCALE (sit.vae) each time and a flip per image and epoch, as the
online VAE path does.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from sit.data.order import flip_for
from sit.errors import UsageError
from sit.files import atomic_json

META_FILE = "meta.json"


def block_marker(feature_path: str, start: int) -> str:
    return os.path.join(feature_path, "done", f"{start:09d}.ok")


def read_meta(feature_path: str) -> Optional[dict]:
    """The folder's meta.json, or None when there is none."""
    path = os.path.join(feature_path, META_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def write_meta(feature_path: str, meta: dict) -> None:
    """Write meta.json atomically."""
    atomic_json(os.path.join(feature_path, META_FILE), meta)


def has_tokens(meta: dict) -> bool:
    """Whether a feature folder holds encoder tokens for representation alignment (older ones do not)."""
    return meta.get("repa_encoder") is not None


def open_token_array(feature_path: str, meta: dict, mode: str) -> np.memmap:
    """Memory-map repa_tokens.npy (N, 2, T, D); mode as open_arrays."""
    path = os.path.join(feature_path, "repa_tokens.npy")
    if mode == "w+":
        shape = (meta["num_images"], 2, *meta["repa_tokens_shape"])
        return np.lib.format.open_memmap(path, mode="w+", dtype=meta["dtype"], shape=shape)
    return np.load(path, mmap_mode=mode)


def open_arrays(feature_path: str, meta: dict, mode: str) -> tuple[np.memmap, np.memmap, np.memmap]:
    """Memory-map (mean, std, labels); mode "w+" creates them, "r+" writes, "r" reads."""
    shape = (meta["num_images"], 2, *meta["latent_shape"])
    arrays = []
    for name, dtype, array_shape in (("mean", meta["dtype"], shape), ("std", meta["dtype"], shape),
                                     ("labels", "int64", (meta["num_images"],))):
        path = os.path.join(feature_path, f"{name}.npy")
        if mode == "w+":
            arrays.append(np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=array_shape))
        else:
            arrays.append(np.load(path, mmap_mode=mode))
    return arrays[0], arrays[1], arrays[2]


class LatentFeatureDataset(Dataset):
    """Items (mean, std, label) of one image or its flip; mean, std: (C, h, w) float32. With
    with_tokens: (mean, std, tokens, label), tokens (T, D) float32 of the same side."""

    def __init__(self, feature_path: str, seed: int = 0, random_flip: bool = True, with_tokens: bool = False):
        meta = read_meta(feature_path)
        if meta is None:
            raise UsageError(f"--feature-path {feature_path} holds no cached features (no {META_FILE}); run "
                             f"extract_features.py first")
        if not meta.get("complete"):
            raise UsageError(f"the features in {feature_path} are incomplete; run extract_features.py again to finish them")
        self.feature_path = feature_path
        self.meta = meta
        self.seed = seed
        self.random_flip = random_flip
        self.with_tokens = with_tokens
        self.epoch = 0
        self.arrays = None  # opened lazily, once per DataLoader worker
        self.tokens = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.meta["num_images"]

    def __getitem__(self, item):
        """item: an index (flipped per `set_epoch`'s epoch) or an (epoch, index) pair, which stays
        right with persistent DataLoader workers that never see set_epoch."""
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        if self.arrays is None:
            self.arrays = open_arrays(self.feature_path, self.meta, "r")
            self.tokens = open_token_array(self.feature_path, self.meta, "r") if self.with_tokens else None
        mean, std, labels = self.arrays
        side = int(self.random_flip and flip_for(self.seed, epoch, index))
        latents = (torch.from_numpy(np.array(mean[index, side], dtype=np.float32)),
                   torch.from_numpy(np.array(std[index, side], dtype=np.float32)))
        if self.tokens is not None:
            latents += (torch.from_numpy(np.array(self.tokens[index, side], dtype=np.float32)),)
        return (*latents, int(labels[index]))
