"""Where a process stands in a torchrun job, and how ranks agree: `agree` runs each rank's part, then every
rank raises the first failing rank's error instead of waiting for it at the next collective."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from sit.errors import RunFailure, SiTError, UsageError

T = TypeVar("T")


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) job."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting RANK and WORLD_SIZE) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_world_size() -> int:
    """The number of processes torchrun started (1 for a plain `python script.py`), before joining."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def launched_rank() -> int:
    """This process's rank as torchrun announced it (0 for a plain process), before joining."""
    return int(os.environ.get("RANK", "0"))


def setup_distributed(timeout_minutes: int = 30) -> DistContext:
    """Join the torchrun job (NCCL on GPUs, Gloo on CPU; the GPU from LOCAL_RANK), or run as one process."""
    use_cuda, launched = torch.cuda.is_available(), launched_by_torchrun()
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not launched:
        return DistContext(rank=0, world_size=1, local_rank=0, device=device)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Synchronise all processes (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all processes, in place (no-op in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def reduce_numbers(values: Sequence[float], device: torch.device, op: str = "sum") -> list[float]:
    """A few numbers reduced over all ranks ("sum" or "max"); the values themselves in a single process."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor.tolist()


def gather_objects(obj: Any) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank (a collective)."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(flag: bool, device: torch.device, group: Any = None) -> bool:
    """Whether `flag` is true on any rank (a collective; `group` e.g. a Gloo group that needs no GPU)."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return bool(tensor.item())


def agree(ctx: DistContext, action: Optional[Callable[[], T]]) -> Optional[T]:
    """Run `action` on this rank (None: this rank only joins), then agree on the outcome (a collective).
    If any rank failed (a SiTError or an OSError), every rank raises the first failing rank's error: a
    UsageError stays one, anything else becomes a RunFailure with its message. Returns this rank's result."""
    result, failure = None, None
    try:
        result = action() if action is not None else None
    except UsageError as error:
        failure = ("usage", str(error), error)
    except (SiTError, OSError) as error:
        failure = ("run", str(error), error)
    if not any_rank(failure is not None, ctx.device):
        return result
    reports = [report for report in gather_objects(failure[:2] if failure else None) if report is not None]
    kind, message = reports[0]
    if failure is not None and failure[1] == message and isinstance(failure[2], SiTError):
        raise failure[2]  # this rank's own error, with its traceback
    raise (UsageError if kind == "usage" else RunFailure)(message)


def on_main(ctx: DistContext, action: Callable[[], T]) -> Optional[T]:
    """Rank 0 runs `action`; every rank learns the outcome (see agree). Returns rank 0's result there, None elsewhere."""
    return agree(ctx, action if ctx.is_main else None)


def main_first(ctx: DistContext, action: Callable[[], T]) -> T:
    """Rank 0 runs `action` first (e.g. a download into a shared cache), then the other ranks (see agree)."""
    on_rank_0 = agree(ctx, action if ctx.is_main else None)
    on_others = agree(ctx, None if ctx.is_main else action)
    return on_rank_0 if ctx.is_main else on_others
