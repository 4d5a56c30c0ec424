"""One writer per folder: an experiment, sample or feature folder holds `owner.lock` while a run writes there:
an advisory `flock` on a file naming its holder as JSON ({"pid", "host", "started", "command"}), taken over
from a dead run with a warning, taken by rank 0 only; a link, a non-regular file, a hard link or content
that names no holder is refused, never followed or taken over (docs/reliability.md)."""
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
OTHER_FILE_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                    (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                    (stat.S_ISBLK, "a block device"))


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
        with contextlib.suppress(OSError):  # a folder moved or removed meanwhile: only the flock is left
            if same_inode(self.path, self.fd):
                os.remove(self.path)
        os.close(self.fd)
        self.fd = -1
        _held.pop(self.path, None)


_held: dict[str, FolderLock] = {}  # this process's locks, by lock file path


def not_a_lock(path: str, what: str) -> UsageError:
    """The one line for a lock file that cannot be ours: it names the file, what it is and what to do."""
    return UsageError(f"{path} is {what}, not a lock file this project wrote, and is never followed or written: "
                      f"remove it if no run writes {os.path.dirname(path)}, and run again")


def check_regular(path: str, info: os.stat_result) -> None:
    """UsageError (not_a_lock) unless `info` is a regular file with one name."""
    if not stat.S_ISREG(info.st_mode):
        kind = next((kind for test, kind in OTHER_FILE_KINDS if test(info.st_mode)), "not a regular file")
        raise not_a_lock(path, kind)
    if info.st_nlink != 1:
        raise not_a_lock(path, f"a file with {info.st_nlink} names (a hard link to another file?)")


def open_lock_file(path: str) -> int:
    """Open (creating it with O_EXCL if missing) the lock file at `path`, read-write, never through a link; an
    existing one is checked with lstat before opening and fstat after. UsageError (not_a_lock) naming `path`
    for a symbolic link, anything but a regular file, or a file with several names."""
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


def is_number(value: object, kinds: type | tuple[type, ...] = (int, float)) -> bool:
    """Whether `value` is of `kinds` (a bool, which Python counts as an int, is not)."""
    return isinstance(value, kinds) and not isinstance(value, bool)


def holder_problem(holder: object) -> str:
    """What is wrong with a lock file's parsed content as a holder ("" if nothing: {"pid": a process id,
    "host": a host name}, with "started" a number and "command" a string where present)."""
    if not isinstance(holder, dict):
        return f"holds {printable(ascii(holder), 60)}, not a JSON object"
    fields = (("pid", None, "pid", "process id", lambda pid: is_number(pid, int) and 0 < pid <= MAX_PID),
              ("host", None, "host", "host name",
               lambda host: isinstance(host, str) and HOST_NAME.match(host)),
              ("started", 0, "start time", "time", is_number),
              ("command", "", "command", "command line", lambda command: isinstance(command, str)))
    for key, default, name, kind, valid in fields:
        value = holder.get(key, default)
        if not valid(value):
            return f"names {name} {printable(ascii(value), 40)}, which is no {kind}"
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
    """"process 1234 on host vm (started 2024-05-01 12:00:00: train.py --resume)" (read_holder's holder)."""
    started = holder.get("started")
    when = "?"
    if is_number(started) and math.isfinite(started):
        with contextlib.suppress(OverflowError, ValueError, OSError):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    command = printable(holder.get("command") or "?")
    return f"process {holder['pid']} on host {holder['host']} (started {when}: {command})"


def write_holder(fd: int) -> None:
    """Name this process as the lock's holder."""
    holder = {"pid": os.getpid(), "host": this_host(), "started": time.time(),
              "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    os.fsync(fd)


def acquire_folder_lock(folder: str, what: str, warn: Callable[[str], None]) -> FolderLock:
    """Lock `folder` for this process. what: how messages name the folder ("the experiment folder");
    warn: called with one line when a dead run's lock is taken over. UsageError naming the folder and the
    holder while a live process (or one on another host) holds it, or naming a lock file that is not one."""
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
    _held[path] = FolderLock(path, fd)
    return _held[path]


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

