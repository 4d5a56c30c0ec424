"""SIGTERM/SIGINT end training cleanly: the step finishes, a checkpoint is saved, exit 0. Under torchrun a
Ctrl-C reaches each worker twice (the terminal's and torchrun's forwarded copy); the copy, within
REPEAT_WINDOW_S, is not taken as a second signal."""
from __future__ import annotations

import signal
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from sit.distributed import any_rank, is_distributed, launched_by_torchrun

REPEAT_WINDOW_S = 5.0  # torchrun forwards a signal within milliseconds of receiving it


class StopSignal:
    """SIGTERM/SIGINT set a flag; a second signal (besides torchrun's forwarded copy) ends at once. The ranks
    agree on stopping by an all_reduce on a Gloo group (no GPU synchronisation)."""

    def __init__(self):
        self.received: Optional[str] = None
        self.received_at = 0.0
        self.forwarded_copy_seen = False
        self.stopped = False  # the ranks agreed to stop
        self.group = None

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if self.is_forwarded_copy(name):
                self.forwarded_copy_seen = True
                return
            raise KeyboardInterrupt(f"second {name}")
        self.received, self.received_at = name, time.monotonic()

    def is_forwarded_copy(self, name: str) -> bool:
        """Whether a repeat of the first signal is torchrun's forwarded copy of it (see the module docstring)."""
        return (launched_by_torchrun() and not self.forwarded_copy_seen and name == self.received
                and time.monotonic() - self.received_at < REPEAT_WINDOW_S)

    def connect(self) -> None:
        """Create the Gloo group used to agree (all ranks must call this)."""
        if is_distributed():
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def agreed(self) -> bool:
        """Whether any rank received a stop signal (a collective in a distributed job)."""
        self.stopped = any_rank(self.received is not None, torch.device("cpu"), group=self.group)
        return self.stopped


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
