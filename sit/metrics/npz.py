"""Image batches in the ADM .npz format (arr_0: uint8 (N, H, W, 3)), read without loading them whole."""
from __future__ import annotations

import math
import zipfile
from typing import Optional

import numpy as np
import torch


def open_npz_images(path: str, key: str = "arr_0") -> np.ndarray:
    """The (N, H, W, 3) uint8 images of an .npz, memory-mapped when stored uncompressed (np.savez),
    else loaded into memory. Raises ValueError for anything else."""
    with zipfile.ZipFile(path) as archive:
        member = f"{key}.npy"
        if member not in archive.namelist():
            raise ValueError(f"{path} has no {key!r} array (it holds {', '.join(archive.namelist())})")
        info = archive.getinfo(member)
        if info.compress_type == zipfile.ZIP_STORED:
            with archive.open(info) as stream:
                version = np.lib.format.read_magic(stream)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = read_header(stream)
                npy_header_size = stream.tell()
            with open(path, "rb") as raw:
                raw.seek(info.header_offset)
                local_header = raw.read(30)  # zip local file header: name and extra lengths at bytes 26-30
                name_length, extra_length = np.frombuffer(local_header[26:30], dtype="<u2")
            offset = info.header_offset + 30 + int(name_length) + int(extra_length) + npy_header_size
            images = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                               order="F" if fortran_order else "C")
        else:
            images = np.load(path)[key]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: {key} must be uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


class NpzBatches(torch.utils.data.Dataset):
    """Consecutive batches of an npz's images as (B, 3, H, W) uint8 tensors; opens the file lazily
    in each DataLoader worker."""

    def __init__(self, path: str, batch_size: int):
        self.path = path
        self.batch_size = batch_size
        self.num_images = len(open_npz_images(path))
        self.images: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.images is None:
            self.images = open_npz_images(self.path)
        batch = np.array(self.images[index * self.batch_size: (index + 1) * self.batch_size])  # a writable copy
        return torch.from_numpy(batch).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
