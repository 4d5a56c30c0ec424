"""Folders with one writer: an experiment folder (train.py), a sample folder (sample_ddp.py) and a
feature folder (extract_features.py) each hold `owner.lock` while a run writes there.

The lock is an advisory `flock` on `<folder>/owner.lock`, which names its holder as JSON
({"pid", "host", "started", "command"}). The kernel drops the flock when its process dies, however it
dies, so a second run is refused only while the first one lives; a lock file that a killed run left
behind (its pid no longer runs on this host) is taken over with a warning. Under torchrun only rank 0
takes the lock; the other ranks learn the outcome through sit.distributed.agree (`on_main`).

The lock file is written in place, not through sit.files.atomic_write: the flock belongs to that very
file, and a rename would put the holder's name on another one.

Results, sample and feature folders may be shared, so the lock file is never trusted to be ours:
- it is created with O_EXCL and an existing one is opened with O_NOFOLLOW, then checked with fstat: a
  symbolic link, a FIFO, a folder, a device or a file with other names (a hard link) at `owner.lock` is
  refused with one line naming it (UsageError: remove it), never opened through, written or deleted;
- a lock file that names no holder in this format (not JSON, not an object, a pid that is no process id,
  a host name no host has) is refused the same way rather than taken over: whether its writer still runs
  cannot be judged, so the user decides (remove it if no run writes the folder). An empty lock file is
  what a run killed between creating and naming it leaves: it is taken over silently, as before.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import stat
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from sit.errors import UsageError
from sit.files import process_alive, same_inode, this_host

LOCK_FILE = "owner.lock"
MAX_PID = 2 ** 31 - 1  # pid_t is a signed 32-bit integer (Linux allows at most 2**22)
HOST_NAME = re.compile(r"^[A-Za-z0-9.-]{1,64}$")  # what sit.files.this_host records
MAX_LOCK_BYTES = 4096  # write_holder's record is a few hundred bytes
# Never block on a FIFO, never make a terminal ours, never follow a link at the lock's own name.
OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)


class ForgedLock(ValueError):
    """A lock file's content is not a holder this module wrote; the message says what it holds."""


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
            if same_inode(self.path, self.fd):
                os.remove(self.path)
        except OSError:
            pass  # a folder moved or removed meanwhile: nothing left to release but the flock
        os.close(self.fd)
        self.fd = -1
        _held.pop(self.path, None)


_held: dict[str, FolderLock] = {}  # this process's locks, by lock file path


def kind_of_file(mode: int) -> str:
    """"a symbolic link", "a folder", "a FIFO", ... for a file that is not a regular one."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def not_a_lock(path: str, what: str) -> UsageError:
    """The one line for a lock file that cannot be ours: it names the file, what it is and what to do."""
    return UsageError(f"{path} is {what}, not a lock file this project wrote, and is never followed or written: "
                      f"remove it if no run writes {os.path.dirname(path)}, and run again")


def check_regular(path: str, info: os.stat_result) -> None:
    """UsageError (not_a_lock) unless `info` is a regular file with one name."""
    if not stat.S_ISREG(info.st_mode):
        raise not_a_lock(path, kind_of_file(info.st_mode))
    if info.st_nlink != 1:
        raise not_a_lock(path, f"a file with {info.st_nlink} names (a hard link to another file?)")


def open_lock_file(path: str) -> int:
    """Open (creating it if missing) the lock file at `path`, read-write, without following a link there.

    A new lock file is created with O_EXCL; an existing one is looked at with lstat before it is opened (a
    device is never opened) and with fstat after (it may have been swapped meanwhile). UsageError naming
    `path` for a symbolic link, anything but a regular file, or a file with several names."""
    while True:
        try:
            return os.open(path, OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        try:
            check_regular(path, os.lstat(path))
            fd = os.open(path, OPEN_FLAGS)
        except FileNotFoundError:
            continue  # its holder removed it meanwhile: create it
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a link (EMLINK on the BSDs)
                raise not_a_lock(path, "a symbolic link") from None
            if error.errno == errno.EISDIR:
                raise not_a_lock(path, "a folder") from None
            raise
        try:
            check_regular(path, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return fd


def printable(text: str, limit: int = 300) -> str:
    """`text` cut to `limit` characters with anything that would break a line or a terminal replaced."""
    return "".join(char if char.isprintable() else "?" for char in text[:limit])


def holder_problem(holder: object) -> str:
    """What is wrong with a lock file's parsed content as a holder ("" if nothing: {"pid": a process id,
    "host": a host name}, with "started" a number and "command" a string where present)."""
    shown = printable(ascii(holder), 60)
    if not isinstance(holder, dict):
        return f"holds {shown}, not a JSON object"
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid <= MAX_PID:
        return f"names pid {printable(ascii(pid), 40)}, which is no process id"
    host = holder.get("host")
    if not isinstance(host, str) or not HOST_NAME.match(host):
        return f"names host {printable(ascii(host), 40)}, which is no host name"
    started = holder.get("started", 0)
    if not isinstance(started, (int, float)) or isinstance(started, bool):
        return f"names start time {printable(ascii(started), 40)}, which is no time"
    if not isinstance(holder.get("command", ""), str):
        return f"names command {printable(ascii(holder.get('command')), 40)}, which is no command line"
    return ""


def read_holder(fd: int) -> dict:
    """The holder a lock file names: {} for an empty file (a run killed before naming itself there);
    ForgedLock saying what it holds instead when that is not a holder in write_holder's format."""
    size = os.fstat(fd).st_size
    if size > MAX_LOCK_BYTES:
        raise ForgedLock(f"holds {size} bytes, more than a holder's name")
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, MAX_LOCK_BYTES + 1)
    if not data.strip():
        return {}
    try:
        holder = json.loads(data.decode())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ForgedLock(f"holds {printable(ascii(data), 60)}, not JSON") from None
    problem = holder_problem(holder)
    if problem:
        raise ForgedLock(problem)
    return holder


def describe_holder(holder: dict) -> str:
    """"process 1234 on host vm (started 2024-05-01 12:00:00: train.py --resume)" (one line, whatever the
    record holds)."""
    started = holder.get("started")
    when = "?"
    if isinstance(started, (int, float)) and not isinstance(started, bool) and math.isfinite(started):
        with contextlib.suppress(OverflowError, ValueError, OSError):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    command = holder.get("command")
    command = printable(command) if isinstance(command, str) and command else "?"
    pid, host = printable(str(holder.get("pid", "?")), 40), printable(str(holder.get("host", "?")), 64)
    return f"process {pid} on host {host} (started {when}: {command})"


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
    process on another host may (which cannot be checked from here); UsageError naming the lock file
    when it is a link or not a regular file, or names no holder in this format (see the module's notes).
    """
    path = os.path.abspath(os.path.join(folder, LOCK_FILE))
    if path in _held:
        return _held[path]  # this process holds it already (a library caller running twice)
    while True:
        fd = open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = read_holder(fd)
                named = describe_holder(holder) if holder else "a run that has not named itself yet"
            except ForgedLock as problem:
                named = f"a process that its lock file {path} does not name (it {problem})"
            os.close(fd)
            raise UsageError(f"{what} {folder} is in use by {named}: wait for that run to end or "
                             f"stop it; two runs must not write one folder") from None
        if same_inode(path, fd):
            break
        os.close(fd)  # the holder removed the file between our open and our flock: lock the new one
    try:
        holder = read_holder(fd)
    except ForgedLock as problem:
        os.close(fd)
        raise UsageError(f"{path} is not a lock file this project wrote (it {problem}), so whether a run still "
                         f"writes {folder} cannot be told: remove it (rm {path}) if none does, and run again") from None
    if holder and holder.get("host") != this_host():
        os.close(fd)
        raise UsageError(f"{what} {folder} is locked by {describe_holder(holder)}, which cannot be checked from "
                         f"this host; if that run has ended, delete {path} and run again")
    if holder and holder.get("pid") != os.getpid():
        state = "no longer runs" if not process_alive(holder["pid"]) else "ended without unlocking"
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

