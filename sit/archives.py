"""Stored arrays judged by their headers before anything is read or inflated: zip archives (a checkpoint,
an .npz) by their central directory, .npy arrays by their header, against the file's size, a sane
compression ratio and the memory available. Each check returns a one-line problem (None: sound); the
caller raises its own error naming the file."""
from __future__ import annotations

import contextlib
import math
import os
import zipfile
from typing import BinaryIO, Optional

import numpy as np

from sit.files import format_bytes

# Deflate cannot beat about 1032:1; real weights and images stay far below 200:1 (the images of a batch
# compress about 2:1), so a record claiming more was made to inflate: a zip bomb.
MAX_COMPRESSION_RATIO = 200
MAX_RECORDS = 1_000_000  # torch.save writes one record per tensor storage


def available_memory() -> int:
    """Bytes of memory this process can still take: MemAvailable, capped by a cgroup limit where one is set."""
    available = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as handle:
        lines = [line for line in handle if line.startswith("MemAvailable:")]
        available = int(lines[0].split()[1]) * 1024 if lines else None
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError), open("/sys/fs/cgroup/memory.max") as limit, \
            open("/sys/fs/cgroup/memory.current") as used:
        text = limit.read().strip()
        if text != "max":
            available = min(available, int(text) - int(used.read().strip()))
    return available


def zip_problem(path: str, whole_in_memory: bool) -> Optional[str]:
    """What is wrong with a zip archive's records, from its central directory alone; None when nothing is
    (or for no zip archive at all). whole_in_memory: torch.load reads every record into memory; otherwise
    only compressed ones are (np.load maps stored ones)."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    file_size = os.path.getsize(path)
    if len(records) > MAX_RECORDS:
        return f"it holds {len(records):,} records (at most {MAX_RECORDS:,} expected)"
    to_memory = 0
    for record in records:
        stored = record.compress_type == zipfile.ZIP_STORED
        if stored and record.file_size != record.compress_size:
            return f"its record {record.filename} claims {record.file_size:,} bytes but stores {record.compress_size:,}"
        if record.header_offset + record.compress_size > file_size:
            return (f"its record {record.filename} claims {format_bytes(record.compress_size)} past the end of the "
                    f"{format_bytes(file_size)} file (truncated or forged)")
        if not stored and record.file_size > MAX_COMPRESSION_RATIO * max(record.compress_size, 1):
            return (f"its record {record.filename} would inflate {format_bytes(record.compress_size)} to "
                    f"{format_bytes(record.file_size)} (a zip bomb?)")
        if whole_in_memory or not stored:
            to_memory += record.file_size
    memory = available_memory()
    if to_memory > memory:
        return f"loading it takes {format_bytes(to_memory)} of memory, only {format_bytes(memory)} available"
    return None


def read_npy_header(stream: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header bytes) of an .npy stream positioned at its start; reads the
    header only (numpy caps its length). ValueError for a stream that is no .npy."""
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    return tuple(shape), fortran_order, dtype, stream.tell()


def npy_data_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """The bytes an array of this shape and dtype holds (exact, in Python integers: no overflow)."""
    return math.prod(int(size) for size in shape) * np.dtype(dtype).itemsize


def npy_size_problem(shape: tuple[int, ...], dtype: np.dtype, header_bytes: int, stored_bytes: int) -> Optional[str]:
    """What is wrong when an .npy header's array does not match the bytes stored after it (None: it does)."""
    if any(int(size) < 0 for size in shape):
        return f"its header claims a negative size {shape}"
    if dtype.hasobject:
        return "it holds Python objects (loading them could run code)"
    claimed = npy_data_bytes(shape, dtype)
    if header_bytes + claimed != stored_bytes:
        stored = format_bytes(stored_bytes - header_bytes)
        return f"its header claims {dtype} {shape} ({format_bytes(claimed)}) but {stored} are stored"
    return None


def npy_file_problem(path: str) -> Optional[str]:
    """What is wrong with an .npy file: no readable header, or a header whose array is not the size stored."""
    try:
        with open(path, "rb") as stream:
            shape, _, dtype, header_bytes = read_npy_header(stream)
    except (ValueError, EOFError, SyntaxError) as error:
        return f"it has no readable .npy header ({error})"
    return npy_size_problem(shape, dtype, header_bytes, os.path.getsize(path))


def npz_problem(path: str) -> Optional[str]:
    """What is wrong with an .npz: its zip records (zip_problem) or an array whose .npy header claims other
    than the bytes its record holds; None when sound or no zip archive. Reads headers only."""
    problem = zip_problem(path, whole_in_memory=False)
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if problem is not None or not record.filename.endswith(".npy"):
                    break
                with archive.open(record) as stream:
                    shape, _, dtype, header_bytes = read_npy_header(stream)
                problem = npy_size_problem(shape, dtype, header_bytes, record.file_size)
                if problem is not None:
                    problem = f"its array {record.filename[:-4]!r}: {problem}"
    except (zipfile.BadZipFile, OSError, EOFError):
        return None  # not a zip archive: the reader says what it is
    except (ValueError, SyntaxError) as error:
        return f"an array header cannot be read ({error})"
    return problem
