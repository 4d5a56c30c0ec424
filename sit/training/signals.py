"""SIGTERM/SIGINT end training cleanly: the current step finishes, a checkpoint is saved, exit 0."""
from __future__ import annotations

import signal
from typing import Any, Optional

import torch
import torch.distributed as dist

from sit.distributed import any_rank, is_distributed


class StopSignal:
    """SIGTERM/SIGINT set a flag; a second signal ends at once.

    All ranks agree on stopping through an all_reduce on a Gloo group, which needs no GPU synchronisation.
    """

    def __init__(self):
        self.received: Optional[str] = None
        self.group = None

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.received = signal.Signals(signum).name

    def connect(self) -> None:
        """Create the Gloo group used to agree (all ranks must call this)."""
        if is_distributed():
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def agreed(self) -> bool:
        """Whether any rank received a stop signal (a collective in a distributed job)."""
        return any_rank(self.received is not None, torch.device("cpu"), group=self.group)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
