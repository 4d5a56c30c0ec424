"""Cached VAE latents: the folder extract_features.py writes and train.py --feature-path reads (format:
docs/speed.md#training-only): meta.json, mean.npy and std.npy (N, 2, C, h, w) of each image and its flip,
labels.npy (N,), repa_tokens.npy (N, 2, T, D) when meta.json names an encoder, done/<start>.ok per block."""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from sit.archives import available_memory, npy_data_bytes, npy_file_problem, read_npy_header
from sit.data.order import flip_for
from sit.errors import UsageError
from sit.files import atomic_json, check_free_space, preallocate
from sit.latents import recorded_latent_space

META_FILE = "meta.json"
FEATURE_DTYPES = ("float16", "float32")
MAX_IMAGES = 100_000_000  # ImageNet-21k holds 14M
BYTES_PER_INDEX = 64  # what a sampler's index list costs per image (a Python int in a list, and a permutation)


def block_marker(feature_path: str, start: int) -> str:
    return os.path.join(feature_path, "done", f"{start:09d}.ok")


def stored_arrays(meta: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """{array name: (shape, dtype)} of a feature folder: mean/std (N, 2, C, h, w), labels (N,), and
    repa_tokens (N, 2, T, D) when meta names an encoder."""
    count, dtype = meta["num_images"], meta["dtype"]
    shape = (count, 2, *meta["latent_shape"])
    arrays = {"mean": (shape, dtype), "std": (shape, dtype), "labels": ((count,), "int64")}
    if has_tokens(meta):
        arrays["repa_tokens"] = ((count, 2, *meta["repa_tokens_shape"]), dtype)
    return arrays


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def meta_problem(meta: object) -> Optional[str]:
    """What is wrong with a meta.json's values (types, bounds, latent shape), or None."""
    if not isinstance(meta, dict):
        return "it is not a JSON object"
    space = recorded_latent_space(meta.get("vae"))  # its geometry (not loaded); a "vae" that is no name: refused below
    downsampling = space.downsampling
    checks = (
        ("image_size", lambda v: _is_int(v) and 1 <= v <= 16384 and v % downsampling == 0,
         f"a multiple of {downsampling}"),
        ("num_images", lambda v: _is_int(v) and 1 <= v <= MAX_IMAGES, f"a count in [1, {MAX_IMAGES:,}]"),
        ("block_size", lambda v: _is_int(v) and v >= 1, "a positive integer"),
        ("dtype", lambda v: v in FEATURE_DTYPES, " or ".join(FEATURE_DTYPES)),
        ("vae", lambda v: isinstance(v, str), "a VAE name"),
        ("classes", lambda v: isinstance(v, list) and 1 <= len(v) <= MAX_IMAGES and all(isinstance(c, str) for c in v),
         "a list of class names"),
        ("latent_shape", lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(n) for n in v), "3 integers"),
        ("complete", lambda v: isinstance(v, bool), "true or false"),
    )
    for key, valid, expected in checks:
        if key not in meta or not valid(meta[key]):
            return f"its {key} is {meta.get(key, 'missing')!r:.80}, expected {expected}"
    tokens_shape = meta.get("repa_tokens_shape")
    if has_tokens(meta) and not (isinstance(tokens_shape, list) and len(tokens_shape) == 2
                                 and all(_is_int(n) and 1 <= n <= 1 << 16 for n in tokens_shape)):
        return f"its repa_tokens_shape is {tokens_shape!r:.80}, expected [tokens, width] of the encoder"
    latent = space.input_size(meta["image_size"])
    if meta["latent_shape"] != [space.channels, latent, latent]:
        return (f"its latent_shape {meta['latent_shape']} is not [{space.channels}, {latent}, {latent}] of "
                f"{meta['image_size']}px images")
    if meta["num_images"] * BYTES_PER_INDEX > available_memory():
        return f"its {meta['num_images']:,} images would not fit the memory of a sampler's index list"
    return None


def arrays_problem(feature_path: str, meta: dict) -> Optional[str]:
    """What is wrong when the arrays on disk are not those meta.json describes (read from their headers), or None."""
    for name, (shape, dtype) in stored_arrays(meta).items():
        path = os.path.join(feature_path, f"{name}.npy")
        if not os.path.isfile(path):
            return f"{name}.npy is missing"
        problem = npy_file_problem(path)
        if problem is None:
            with open(path, "rb") as stream:
                stored_shape, _, stored_dtype, _ = read_npy_header(stream)
            if (stored_shape, str(stored_dtype)) != (shape, dtype):
                problem = f"it holds {stored_dtype} {stored_shape}, meta.json says {dtype} {shape}"
        if problem is not None:
            return f"{name}.npy: {problem}"
    return None


def read_meta(feature_path: str) -> Optional[dict]:
    """The folder's meta.json, or None; UsageError naming the file when it is no JSON, holds absurd values,
    or disagrees with the arrays' headers."""
    path = os.path.join(feature_path, META_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            meta = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not valid JSON ({error}); delete {feature_path} and run extract_features.py "
                         f"again") from None
    problem = meta_problem(meta) or arrays_problem(feature_path, meta)
    if problem is not None:
        raise UsageError(f"{path} does not describe usable features: {problem}; delete {feature_path} and run "
                         f"extract_features.py again")
    return meta


def write_meta(feature_path: str, meta: dict) -> None:
    """Write meta.json atomically."""
    atomic_json(os.path.join(feature_path, META_FILE), meta)


def has_tokens(meta: dict) -> bool:
    """Whether a feature folder holds encoder tokens for representation alignment (older ones do not)."""
    return meta.get("repa_encoder") is not None


def open_array(path: str, shape: tuple[int, ...], dtype: str, mode: str) -> np.memmap:
    """Memory-map one .npy: "w+" creates it, "r+" writes (both preallocate), "r" reads."""
    if mode == "w+":
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        preallocate(path)
        return array
    if mode == "r+":
        preallocate(path)
    return np.load(path, mmap_mode=mode)


def open_token_array(feature_path: str, meta: dict, mode: str) -> np.memmap:
    """Memory-map repa_tokens.npy (N, 2, T, D), as open_array (its space is checked by open_arrays)."""
    return open_array(os.path.join(feature_path, "repa_tokens.npy"), *stored_arrays(meta)["repa_tokens"], mode)


def arrays_bytes(meta: dict) -> int:
    """The data bytes of a feature folder's arrays (encoder tokens included)."""
    return sum(npy_data_bytes(shape, np.dtype(dtype)) for shape, dtype in stored_arrays(meta).values())


def open_arrays(feature_path: str, meta: dict, mode: str) -> tuple[np.memmap, np.memmap, np.memmap]:
    """Memory-map (mean, std, labels) as open_array; "w+" first checks the free space for every array."""
    if mode == "w+":
        check_free_space(feature_path, arrays_bytes(meta), f"the features of {meta['num_images']:,} images")
    mean, std, labels = (open_array(os.path.join(feature_path, f"{name}.npy"), shape, dtype, mode)
                         for name, (shape, dtype) in stored_arrays(meta).items() if name != "repa_tokens")
    return mean, std, labels


class LatentFeatureDataset(Dataset):
    """Items (mean, std[, tokens], label) of one image or its flip: (C, h, w), (C, h, w), (T, D) float32."""

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
        """item: an index (flipped per set_epoch's epoch) or an (epoch, index) pair (persistent workers)."""
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
