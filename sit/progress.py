"""Feedback while a script runs, on rank 0: a tqdm bar when stderr is a terminal, else (a log file, a
batch job) one plain line every few seconds, so that a redirected run still shows that it moves."""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable, Optional, TextIO, Union

from tqdm import tqdm

if TYPE_CHECKING:
    import torch

LINE_INTERVAL_S = 10.0  # seconds between two plain progress lines (stderr not a terminal)
READ_INTERVAL_S = 0.5  # seconds between two reads of a sampler's t held on its device (each read waits for it)


def format_duration(seconds: float) -> str:
    """A short duration: 42s, 3m05s, 2h07m."""
    seconds = int(round(max(seconds, 0.0)))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress towards `total` (None: unknown) in `unit`s on stderr: a tqdm bar on a terminal, else a line
    `<desc>: <n>/<total> <unit> (<pct>%), <rate>, ETA <t>` at most every `interval` seconds and one when
    closed; nothing when disabled. `stream` and `clock` stand in for stderr and time.monotonic in tests."""

    def __init__(self, desc: str, total: Optional[float], unit: str, *, enabled: bool = True, initial: float = 0,
                 interval: float = LINE_INTERVAL_S, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.desc, self.total, self.unit = desc, total, unit
        self.enabled, self.interval, self.clock = enabled, interval, clock
        self.stream = stream if stream is not None else sys.stderr
        self.n, self.initial, self.postfix = initial, initial, ""
        self.start = self.last_line = clock()
        self.bar = (tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)
                    if enabled and self.stream.isatty() else None)

    def update_to(self, n: float, **postfix: object) -> None:
        """Progress is now n (and these key=value notes); shows it when due."""
        if not self.enabled:
            return
        self.postfix = ", ".join(f"{key} {value}" for key, value in postfix.items())
        if self.bar is not None:
            self.bar.update(n - self.bar.n)
            if postfix:
                self.bar.set_postfix_str(self.postfix, refresh=False)
        self.n = n
        if self.bar is None and self.clock() - self.last_line >= self.interval:
            self.write_line()

    def line(self) -> str:
        """The plain progress line for the current state."""
        elapsed = self.clock() - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        amount = f"{self.n:g}/{self.total:g} {self.unit} ({100.0 * self.n / self.total:.0f}%)" if self.total \
            else f"{self.n:g} {self.unit}"
        speed = f"{rate:.3g} {self.unit}/s" if rate else f"{format_duration(elapsed)} elapsed"
        parts = [f"{self.desc}: {amount}", speed]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def write_line(self) -> None:
        self.last_line = self.clock()
        print(self.line(), file=self.stream, flush=True)

    def close(self, final: Optional[float] = None) -> None:
        """End the bar, or write the last line (when anything moved); `final`: where progress ended."""
        if not self.enabled:
            return
        if final is not None:
            if self.bar is not None:
                self.bar.update(final - self.bar.n)
            self.n = final
        if self.bar is not None:
            self.bar.close()
        elif self.n != self.initial:
            self.write_line()
        self.enabled = False


class SamplerProgress:
    """Progress of one sampler run through [0, 1], fed with each model evaluation's t (sit.generation's
    on_evaluation; 1 - t for a reverse ODE), and the model evaluations made so far."""

    def __init__(self, reverse: bool = False, **progress_options: object):
        self.progress = Progress("sampling", 1.0, "t", **progress_options)
        self.reverse, self.evaluations, self.position, self.last_read = reverse, 0, 0.0, -float("inf")

    def __call__(self, t: Union[float, "torch.Tensor"]) -> None:
        """One model evaluation at t: a number, or a 0-dim tensor on the sampler's device, read (a
        synchronisation) at most every READ_INTERVAL_S seconds; the others are counted."""
        self.evaluations += 1
        if not isinstance(t, (int, float)):
            now = self.progress.clock()
            if now - self.last_read < READ_INTERVAL_S:
                return
            self.last_read = now
        position = 1.0 - float(t) if self.reverse else float(t)
        self.position = min(1.0, max(self.position, position))  # an adaptive solver may retry a step
        self.progress.update_to(round(self.position, 3), evaluations=self.evaluations)

    def close(self) -> None:
        """The run is done: at the end of the interval, with every evaluation counted."""
        if self.evaluations:
            self.progress.update_to(round(self.position, 3), evaluations=self.evaluations)
        self.progress.close(final=1.0 if self.evaluations else None)
