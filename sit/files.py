"""Every file the project writes goes through `atomic_write`: a temporary file beside the target,
flushed to disk, then renamed over it. A crash never leaves a partial file at the final path.

Temporary names start with `.tmp-` and end with a suffix the caller chooses, so that the owner of a
folder can recognise (and remove) what a killed run left behind (`remove_temporaries`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from typing import Any, Callable

import torch

TEMPORARY_PREFIX = ".tmp-"


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only swap it)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)  # elsewhere: swap and restore at once
    os.umask(umask)
    return umask


def fsync_path(path: str) -> None:
    """Flush a file's (or a folder's) data to disk; folders are best effort (not every system can open them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it to `path`.

    The temporary name is `.tmp-XXXXXXXX<suffix>`; on any failure it is removed and the error
    propagates. The file gets the permissions the umask gives a new file (mkstemp's own are 0600).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=TEMPORARY_PREFIX, suffix=suffix)
    os.close(fd)
    try:
        write(tmp_path)
        fsync_path(tmp_path)
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    fsync_path(directory)  # the rename itself


def _torch_save(obj: Any, path: str) -> None:
    """torch.save, with its RuntimeError on a failed write (e.g. a full disk) turned into an OSError."""
    try:
        torch.save(obj, path)
    except RuntimeError as error:
        raise OSError(f"torch.save could not write {path}: {str(error).splitlines()[0]}") from error


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file beside `path`, then rename."""
    atomic_write(path, functools.partial(_torch_save, obj), suffix=".pt")


def _dump_json(data: Any, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def atomic_json(path: str, data: Any) -> None:
    """`data` as indented JSON at `path`, atomically."""
    atomic_write(path, functools.partial(_dump_json, data), suffix=".json")


def _write_text(text: str, path: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def atomic_text(path: str, text: str) -> None:
    """A small text file at `path`, atomically."""
    atomic_write(path, functools.partial(_write_text, text), suffix=".txt")


def remove_temporaries(folder: str, suffix: str) -> int:
    """Delete the temporary files atomic_write left in `folder` with this suffix (a killed run's); returns how many."""
    if not os.path.isdir(folder):
        return 0
    stale = [name for name in os.listdir(folder) if name.startswith(TEMPORARY_PREFIX) and name.endswith(suffix)]
    for name in stale:
        os.remove(os.path.join(folder, name))
    return len(stale)


def sha256_file(path: str, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits (read in chunks: weights and batches can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_fingerprint(path: str) -> str:
    """A short identifier of a file's content, "sha256:<first 16 hex digits>" (for cache keys)."""
    return "sha256:" + sha256_file(path)[:16]


def folder_sha256(folder: str) -> str:
    """The SHA-256 of a folder's files: of the lines "<relative path> <its sha256>", sorted (64 hex digits).

    Names and contents count, so renaming, changing, adding or removing a file changes it.
    """
    lines = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            lines.append(f"{os.path.relpath(path, folder)} {sha256_file(path)}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()
