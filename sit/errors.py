"""The library's exceptions; only the scripts turn them into one line and an exit code
(`UsageError`: the user can fix it, exit 2; `RunFailure`: the run failed, exit 1)."""
from __future__ import annotations

import contextlib
from typing import Iterator


class SiTError(Exception):
    """Base of the library's own errors: their message is one line meant for the user."""

    exit_code = 1


class UsageError(SiTError, ValueError):
    """Bad input the user can fix; the message names the flag or file and what to do instead."""

    exit_code = 2


class RunFailure(SiTError, RuntimeError):
    """The run failed (disk, divergence, a failure on another rank); what was saved is kept."""

    exit_code = 1


@contextlib.contextmanager
def reported_as(what: str) -> Iterator[None]:
    """Turn an OSError inside the block into a RunFailure saying what failed: "<what>: <the OSError>"."""
    try:
        yield
    except OSError as error:
        raise RunFailure(f"{what}: {error}") from error


@contextlib.contextmanager
def named_by(flag: str) -> Iterator[None]:
    """A UsageError inside the block that names no flag is `flag`'s: "<flag>: <message>" (same type)."""
    try:
        yield
    except UsageError as error:
        if "--" in str(error):
            raise
        raise type(error)(f"{flag}: {error}") from None


def error_line(error: BaseException, limit: int = 200, with_type: bool = True) -> str:
    """`Type: the first line of its message` (with_type=False: the line alone), cut to `limit` characters;
    the type's name for an empty message."""
    lines = str(error).strip().splitlines()
    first = lines[0].strip()[:limit] if lines else ""
    if not first:
        return type(error).__name__
    return f"{type(error).__name__}: {first}" if with_type else first
