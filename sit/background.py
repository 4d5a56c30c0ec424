"""Writes off the critical path: a state copied to CPU memory (pinned on a GPU, copies queued on the current
stream), then written by a thread, one write at a time, while the work goes on; a failed write surfaces at
the next wait. Used by --background-checkpoints (a checkpoint file holds the same bytes as a foreground
write of a CPU run) and by sample_ddp.py, whose PNGs of one batch are written while the next one samples.
"""
from __future__ import annotations

import copy
import threading
from typing import Any, Callable, Optional

import torch


def cpu_snapshot(value: Any, pin: bool = False) -> tuple[Any, Optional[torch.cuda.Event]]:
    """A copy of nested dicts, lists and tuples with every tensor storage copied to CPU memory (pinned with
    pin), shared where the originals share; and the event after which GPU copies are complete (or None)."""
    storages: dict[int, torch.UntypedStorage] = {}
    on_gpu = False

    def copied(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal on_gpu
        storage = tensor.untyped_storage()
        if storage._cdata not in storages:
            on_gpu = on_gpu or storage.device.type == "cuda"
            pinned = pin and storage.device.type == "cuda"
            target = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
            target.copy_(storage, non_blocking=pinned)
            storages[storage._cdata] = target
        return torch.empty(0, dtype=tensor.dtype).set_(storages[storage._cdata], tensor.storage_offset(),
                                                       tensor.size(), tensor.stride())

    def walk(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return copied(item.detach())
        if isinstance(item, dict):
            result = copy.copy(item)  # keeps the type and attributes (a state dict's _metadata)
            for key in result:
                result[key] = walk(result[key])
            return result
        if isinstance(item, list):
            return [walk(entry) for entry in item]
        if type(item) is tuple:
            return tuple(walk(entry) for entry in item)
        return item

    snapshot = walk(value)
    ready = None
    if on_gpu:
        ready = torch.cuda.Event()
        ready.record()
    return snapshot, ready


class BackgroundWriter:
    """One write at a time in a background thread; `wait` joins it and re-raises what it raised."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.path: Optional[str] = None  # the file being written (or last written)

    def start(self, path: str, write: Callable[[], None], ready: Optional[torch.cuda.Event] = None) -> None:
        """Run write() in the background once `ready` (the snapshot's copies) completes; wait() first."""
        if self._thread is not None:
            raise RuntimeError("BackgroundWriter.start while a write is in flight: wait() first")

        def run() -> None:
            try:
                if ready is not None:
                    ready.synchronize()
                write()
            except BaseException as error:  # re-raised by wait() in the loop's thread
                self._error = error

        self.path, self._error = path, None
        self._thread = threading.Thread(target=run, name=f"background writer {path}")
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; raise its error, once."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
