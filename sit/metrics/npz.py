"""Image batches and statistics in .npz files: read (images memory-mapped) and written atomically; a file
that is not a usable .npz, or whose headers claim more than it stores or memory holds, is a MetricInputError."""
from __future__ import annotations

import contextlib
import functools
import math
import os
import zipfile
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from sit.archives import npz_problem, read_npy_header
from sit.files import atomic_write
from sit.metrics.errors import MetricInputError

# What numpy and zipfile raise for a file that is not an .npz (or a damaged one).
UNREADABLE_NPZ = (zipfile.BadZipFile, EOFError, ValueError)
NPY_MAGIC = b"\x93NUMPY"


@contextlib.contextmanager
def judged_npz(path: str) -> Iterator[None]:
    """MetricInputError naming the file: before the block when its headers are refused (npz_problem), and
    for what numpy or zipfile raise inside it."""
    problem = npz_problem(path)
    if problem is not None:
        raise MetricInputError(f"refused to read {path}: {problem}")
    try:
        yield
    except MetricInputError:
        raise
    except UNREADABLE_NPZ as error:
        raise MetricInputError(f"{path} is not a readable .npz file ({error})") from None


@contextlib.contextmanager
def open_npz(path: str) -> Iterator[np.lib.npyio.NpzFile]:
    """np.load of an .npz (arrays read on access); MetricInputError naming the file when it is none."""
    with open(path, "rb") as handle:
        start = handle.read(len(NPY_MAGIC))
    if not zipfile.is_zipfile(path) and start != NPY_MAGIC:  # numpy would try it as a pickle
        raise MetricInputError(f"{path} is not an .npz file (neither a zip archive nor a NumPy array; it starts "
                               f"with {start!r}): pass the .npz that sample_ddp.py or the ADM suite wrote")
    with judged_npz(path):
        data = np.load(path)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise MetricInputError(f"{path} is not an .npz file (it holds a single array)")
    with data:
        yield data


def read_array_header(archive: zipfile.ZipFile, path: str, key: str) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header size) of the `key` array in an open .npz, from its header only."""
    member = f"{key}.npy"
    if member not in archive.namelist():
        raise MetricInputError(f"{path} has no {key!r} array (it holds {', '.join(archive.namelist())})")
    with archive.open(member) as stream:
        return read_npy_header(stream)


def read_stored_images(path: str, key: str) -> np.ndarray:
    """The `key` array of an .npz: memory-mapped when stored uncompressed (np.savez), else loaded."""
    with zipfile.ZipFile(path) as archive:
        shape, fortran_order, dtype, npy_header_size = read_array_header(archive, path, key)
        info = archive.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with np.load(path) as data:  # closes the file once the array is read
                return data[key]
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local_header = raw.read(30)  # zip local file header: name and extra lengths at bytes 26-30
        name_length, extra_length = np.frombuffer(local_header[26:30], dtype="<u2")
    offset = info.header_offset + 30 + int(name_length) + int(extra_length) + npy_header_size
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def npz_array_shape(path: str, key: str = "arr_0") -> tuple[int, ...]:
    """The shape of an .npz's array from its header; MetricInputError naming the file otherwise."""
    with judged_npz(path), zipfile.ZipFile(path) as archive:
        return tuple(read_array_header(archive, path, key)[0])


def open_npz_images(path: str, key: str = "arr_0") -> np.ndarray:
    """The (N, H, W, 3) uint8 images of an .npz (read_stored_images); MetricInputError naming the file otherwise."""
    with judged_npz(path):
        images = read_stored_images(path, key)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise MetricInputError(f"{path}: {key} must be uint8 images of shape (N, H, W, 3), "
                               f"got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise MetricInputError(f"{path}: {key} holds no images")
    return images


def save_npz_atomic(path: str, **arrays: np.ndarray) -> None:
    """np.savez (uncompressed, so open_npz_images can memory-map it) to a temporary file, then rename."""
    atomic_write(path, functools.partial(np.savez, **arrays), suffix=".npz")


class NpzBatches(torch.utils.data.Dataset):
    """Consecutive (B, 3, H, W) uint8 batches of an npz's images, opened lazily in each DataLoader worker."""

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


def image_batches(path: str, batch_size: int = 64, num_workers: int = 0,
                  description: str = "") -> Iterator[torch.Tensor]:
    """An npz's `arr_0` (N, H, W, 3) uint8 as consecutive (B, 3, H, W) uint8 batches, with a progress bar."""
    loader = torch.utils.data.DataLoader(NpzBatches(path, batch_size), batch_size=None, shuffle=False,
                                         num_workers=num_workers)
    yield from tqdm(loader, desc=description or os.path.basename(path), unit="batch")
