"""Every file the project writes goes through `atomic_write`: a temporary `.tmp-<pid>@<host>~XXXXXXXX<suffix>`
beside the target, flushed, then renamed over it (docs/reliability.md). A write that runs out of space
raises `NoSpaceLeft`, one line naming the file; `check_free_space` refuses heavy work up front."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import stat
import tempfile
from typing import Any, BinaryIO, Callable, Collection, Iterator, Optional, Sequence

import torch

from sit.errors import RunFailure

TEMPORARY_PREFIX = ".tmp-"
# .tmp-<pid>@<host>~<random><suffix>: host names hold letters, digits, dots and hyphens, never "@" or "~"
OWNED_TEMPORARY = re.compile(r"^\.tmp-(\d+)@([A-Za-z0-9.-]+)~")
STEP_FILE = re.compile(r"^(\d{7,})\.pt$")  # <step>.pt: a train checkpoint or a post-hoc EMA snapshot
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# What torch.save's C++ writer says when a write comes up short (it loses the errno).
TORCH_SHORT_WRITE = re.compile(r"unexpected pos|file write failed|enforce fail at inline_container")


class NoSpaceLeft(RunFailure):
    """A write failed for want of disk space (or a file size limit); the message names the file."""


def this_host() -> str:
    """This machine's name as temporary and lock files record it (letters, digits, dots, hyphens)."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "localhost"


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def held_by_another_process(name: str) -> bool:
    """Whether a temporary file may still be written: by another live process on this host, or on another
    host (which cannot be checked from here)."""
    owner = OWNED_TEMPORARY.match(name)
    if owner is None:
        return False
    pid, host = int(owner.group(1)), owner.group(2)
    return host != this_host() or (pid != os.getpid() and process_alive(pid))


def free_bytes(path: str) -> int:
    """Bytes available to this user on the file system holding `path` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def format_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def check_free_space(path: str, needed: int, what: str) -> None:
    """NoSpaceLeft when `needed` bytes (an estimate of what `what` will write at `path`) do not fit there."""
    available = free_bytes(path)
    if needed > available:
        raise NoSpaceLeft(f"no space left on {path}: {what} needs about {format_bytes(needed)}, only "
                          f"{format_bytes(available)} free; free some space or write elsewhere")


def preallocate(path: str) -> None:
    """Reserve the disk blocks of a file's whole length (a sparse memory-mapped file): a write through the
    map to a full disk is then no SIGBUS; NoSpaceLeft when the blocks are not there."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as error:
        if is_no_space(error):
            raise no_space_left(path, error) from error
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: nothing reserved
            raise
    finally:
        os.close(fd)


def is_no_space(error: BaseException) -> bool:
    """Whether a failed write ran out of space: ENOSPC, a quota, a file size limit, or torch.save's short write."""
    return (isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS
            or isinstance(error, RuntimeError) and TORCH_SHORT_WRITE.search(str(error)) is not None)


def no_space_left(path: str, error: BaseException) -> NoSpaceLeft:
    """The one-line error for a write of `path` that ran out of space."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    return NoSpaceLeft(f"no space left on {path}: {reason} ({format_bytes(free_bytes(path))} free); free some "
                       f"space and run the same command again")


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only swap it)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)  # elsewhere: swap and restore at once
    os.umask(umask)
    return umask


def fsync_path(path: str) -> None:
    """Flush a file's (or a folder's) data to disk; folders are best effort (not every system can open them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not os.path.isdir(path):
            raise


def same_inode(path: str, fd: int) -> bool:
    """Whether the name `path` itself (a link there is not followed) is the file open as `fd`."""
    try:
        here, opened = os.lstat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (opened.st_dev, opened.st_ino)


def _write_through_temporary(path: str, write: Callable[[int, str], None], suffix: str) -> None:
    """atomic_write's work: write(fd, tmp_path) fills the temporary open as fd. mkstemp never opens a planted
    link or file; permissions are set through fd, never by name, and the rename happens only while the name
    still is that file (os.replace puts it in place of a link at `path`, never writes through one)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f"{TEMPORARY_PREFIX}{os.getpid()}@{this_host()}~",
                                        suffix=suffix)
    except OSError as error:
        if is_no_space(error):
            raise no_space_left(path, error) from error
        raise
    try:
        try:
            write(fd, tmp_path)
            if not same_inode(tmp_path, fd):
                raise RunFailure(f"{tmp_path} was replaced by another file (or a link) while {path} was written "
                                 f"through it; {path} was left as it was: does someone else write in {directory}?")
            os.fsync(fd)
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)
        os.replace(tmp_path, path)
    except BaseException as error:
        with contextlib.suppress(OSError):  # the name only: a link there is removed, never what it points to
            os.remove(tmp_path)
        for cause in (error, error.__cause__):  # _torch_save keeps torch's RuntimeError as the cause
            if cause is not None and is_no_space(cause):
                raise no_space_left(path, cause) from error
        raise
    fsync_path(directory)  # the rename itself


def atomic_write(path: str, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it to `path` (with the
    umask's permissions). On any failure the temporary is removed and the error propagates, a full disk as
    NoSpaceLeft; RunFailure (nothing renamed) if tmp_path no longer is the temporary after write()."""
    _write_through_temporary(path, lambda fd, tmp_path: write(tmp_path), suffix)


def _torch_save(obj: Any, path: str) -> None:
    """torch.save, with its RuntimeError on a failed write (e.g. a full disk) turned into an OSError."""
    try:
        torch.save(obj, path)
    except RuntimeError as error:
        raise OSError(f"torch.save could not write {path}: {str(error).splitlines()[0]}") from error


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file beside `path`, then rename."""
    atomic_write(path, lambda tmp_path: _torch_save(obj, tmp_path), suffix=".pt")


def atomic_text(path: str, text: str, suffix: str = ".txt") -> None:
    """A small text file at `path`, atomically, written through the temporary's own descriptor."""

    def write(fd: int, tmp_path: str) -> None:
        with os.fdopen(os.dup(fd), "w") as handle:
            handle.write(text)

    _write_through_temporary(path, write, suffix)


def atomic_json(path: str, data: Any) -> None:
    """`data` as indented JSON at `path`, atomically."""
    atomic_text(path, json.dumps(data, indent=2) + "\n", suffix=".json")


def move_file(source: str, destination: str) -> None:
    """Move a file to `destination` (its folder made if needed) by one rename: whole or not at all."""
    os.makedirs(os.path.dirname(os.path.abspath(destination)), exist_ok=True)
    os.replace(source, destination)


@contextlib.contextmanager
def removed_on_failure_if_empty(folders: Sequence[str], ignoring: Collection[str] = (),
                                enabled: bool = True) -> Iterator[None]:
    """On an exception inside the block, remove each of folders, in order, that holds nothing but the
    names in `ignoring` (a lock file, a settings record); re-raise."""
    try:
        yield
    except BaseException:
        for folder in folders if enabled else ():
            if not os.path.isdir(folder):
                continue
            names = os.listdir(folder)
            if set(names) <= set(ignoring):
                for name in names:
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, name))
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        raise


def remove_temporaries(folder: str, suffix: str, prefix: str = TEMPORARY_PREFIX) -> int:
    """Delete the temporary files with this suffix that killed runs left in `folder`, except those another
    process may still be writing (held_by_another_process); returns how many."""
    if not os.path.isdir(folder):
        return 0
    removed = 0
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(suffix) and not held_by_another_process(name):
            with contextlib.suppress(FileNotFoundError):  # its writer finished (renamed it) meanwhile
                if stat.S_ISDIR(os.lstat(os.path.join(folder, name)).st_mode):
                    continue  # not a temporary file of ours; a link is removed itself, never what it points to
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


def step_files(folder: str) -> list[tuple[int, str]]:
    """(step, path) of every <step>.pt file in folder (train checkpoints, post-hoc EMA snapshots), by step."""
    if not os.path.isdir(folder):
        return []
    found = [(int(match.group(1)), os.path.join(folder, name))
             for name in os.listdir(folder) if (match := STEP_FILE.match(name))]
    return sorted(found)


def sha256_of(stream: BinaryIO) -> str:
    """The SHA-256 of a binary stream's bytes from where it stands on, as 64 hex digits (read in chunks)."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 24), b""):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits."""
    with open(path, "rb") as file:
        return sha256_of(file)


def file_fingerprint(path: str) -> str:
    """A short identifier of a file's content, "sha256:<first 16 hex digits>" (for cache keys)."""
    return "sha256:" + sha256_file(path)[:16]


def folder_sha256(folder: str) -> str:
    """The SHA-256 of the sorted lines "<relative path> <its sha256>" of a folder's files (64 hex digits)."""
    lines = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            lines.append(f"{os.path.relpath(path, folder)} {sha256_file(path)}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def folder_problem(path: str) -> Optional[str]:
    """Why a folder at `path` cannot be written (None if it can): a file is there, or the nearest existing
    folder above it is a file or not writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is not a folder (it is a file)"
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the nearest folder that exists: the rest is created in it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is not a folder, so nothing can be created in it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write in {existing}"
    return None
