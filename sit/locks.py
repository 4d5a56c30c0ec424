"""Folders with one writer: an experiment folder (train.py), a sample folder (sample_ddp.py) and a
feature folder (extract_features.py) each hold `owner.lock` while a run writes there.

The lock is an advisory `flock` on `<folder>/owner.lock`, which names its holder as JSON
({"pid", "host", "started", "command"}). The kernel drops the flock when its process dies, however it
dies, so a second run is refused only while the first one lives; a lock file that a killed run left
behind (its pid no longer runs on this host) is taken over with a warning. Under torchrun only rank 0
takes the lock; the other ranks learn the outcome through sit.distributed.agree (`on_main`).

The lock file is written in place, not through sit.files.atomic_write: the flock belongs to that very
file, and a rename would put the holder's name on another one.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from sit.errors import UsageError
from sit.files import process_alive, this_host

LOCK_FILE = "owner.lock"


@dataclass
class FolderLock:
    """A held lock: the lock file's path and the open file that carries the flock."""
    path: str
    fd: int

    def release(self) -> None:
        """Remove the lock file (it is ours while we hold the flock) and drop the flock."""
        if self.fd < 0:
            return
        try:
            if same_file(self.path, self.fd):
                os.remove(self.path)
        except OSError:
            pass  # a folder moved or removed meanwhile: nothing left to release but the flock
        os.close(self.fd)
        self.fd = -1
        _held.pop(self.path, None)


_held: dict[str, FolderLock] = {}  # this process's locks, by lock file path


def same_file(path: str, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (not removed or replaced since it was opened)."""
    try:
        here, opened = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (opened.st_dev, opened.st_ino)


def read_holder(fd: int) -> dict:
    """The holder a lock file names ({} when it names none: empty, or not this format)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 4096).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict) -> str:
    """"process 1234 on host vm (started 2024-05-01 12:00:00: train.py --resume)"."""
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    command = holder.get("command") or "?"
    return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {when}: {command})"


def write_holder(fd: int) -> None:
    """Name this process as the lock's holder."""
    holder = {"pid": os.getpid(), "host": this_host(), "started": time.time(),
              "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    os.fsync(fd)


def acquire_folder_lock(folder: str, what: str, warn: Callable[[str], None]) -> FolderLock:
    """Lock `folder` for this process (creating the folder's lock file).

    what: how messages name the folder ("the experiment folder", "the sample folder");
    warn: called with one line when a dead run's lock is taken over.
    Raises UsageError naming the folder and the holder when a live process holds it, or when a
    process on another host may (which cannot be checked from here).
    """
    path = os.path.abspath(os.path.join(folder, LOCK_FILE))
    if path in _held:
        return _held[path]  # this process holds it already (a library caller running twice)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise UsageError(f"{what} {folder} is in use by {describe_holder(holder)}: wait for that run to end or "
                             f"stop it; two runs must not write one folder") from None
        if same_file(path, fd):
            break
        os.close(fd)  # the holder removed the file between our open and our flock: lock the new one
    holder = read_holder(fd)
    if holder and holder.get("host") != this_host():
        os.close(fd)
        raise UsageError(f"{what} {folder} is locked by {describe_holder(holder)}, which cannot be checked from "
                         f"this host; if that run has ended, delete {path} and run again")
    if holder and holder.get("pid") != os.getpid():
        state = "no longer runs" if not process_alive(int(holder.get("pid", 0) or 0)) else "ended without unlocking"
        warn(f"warning: {path} was left by {describe_holder(holder)}, which {state} (killed?); taking it over")
    write_holder(fd)
    lock = FolderLock(path, fd)
    _held[path] = lock
    return lock


def holds_folder_lock(folder: str) -> bool:
    """Whether this process holds `folder`'s lock (taken by acquire_folder_lock and not yet released)."""
    return os.path.abspath(os.path.join(folder, LOCK_FILE)) in _held


@contextlib.contextmanager
def folder_locks_released() -> Iterator[None]:
    """Release the locks taken inside the block when it ends, however it ends."""
    before = set(_held)
    try:
        yield
    finally:
        for path in [path for path in _held if path not in before]:
            _held[path].release()

