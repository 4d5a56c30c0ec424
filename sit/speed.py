"""Numeric precision, compilation and CPU threads: the --precision and --compile flags' meaning, and how
many threads a CPU process runs, in one place."""
from __future__ import annotations

import contextlib
import os
from typing import Mapping, Optional

import torch

# --precision choice -> autocast dtype (None: no autocast). tf32 is fp32 storage with TF32 matmuls.
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def configure_precision(precision: str) -> None:
    """Set the global matmul precision flags for a --precision choice (TF32 only on GPUs)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    allow_tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32


def autocast(precision: str, device: torch.device):
    """The autocast context for a --precision choice: bf16/fp16 mixed precision, or a no-op.

    Parameters stay fp32; only the forward's matmuls and convolutions run in the lower precision.
    """
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile every SiT block in place (static shapes) and return the model.

    Blocks rather than the whole model: DDP still overlaps gradient all-reduce with the backward
    of earlier blocks, gradient checkpointing recomputes a compiled block, forward_with_cfg
    (which calls self.forward) runs compiled too, and all blocks share one graph. The time t
    reaches the blocks only as the tensor c, so sampler steps at new times never recompile.
    Compile after any deepcopy (e.g. the EMA): a copy would keep calling the original's blocks.
    """
    for block in model.blocks:
        block.compile(dynamic=False)
    return model


def compile_for_sampling(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile the whole forward for inference and return the model.

    The weights are frozen into the graph (Inductor's freezing: constant folding and, on CPU,
    prepacked oneDNN matmuls) and, on CPU, kernels are autotuned: about 1.3x per sampler step on a
    2-core CPU (benchmarks/bench.py), at ~1 min of compilation. Only for weights that no longer
    change (the sampling scripts); training uses compile_model.
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    on_cpu = all(not param.is_cuda for param in model.parameters())
    model.forward = torch.compile(model.forward, dynamic=False, mode="max-autotune-no-cudagraphs" if on_cpu else None)
    return model


THREADS_ENV = "OMP_NUM_THREADS"  # torchrun sets it to 1 per process when it starts several and it is unset


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_thread_choice(environ: Mapping[str, str], cores: int, local_processes: int) -> tuple[int, str]:
    """(threads per process, why) for torch on a CPU: OMP_NUM_THREADS when set (the user's or
    torchrun's choice), else the cores shared evenly by this machine's processes (at least 1)."""
    given = environ.get(THREADS_ENV, "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given), f"{THREADS_ENV}={given}"
    processes = max(local_processes, 1)
    plural = "es" if processes > 1 else ""
    return max(1, cores // processes), f"{cores} cores / {processes} process{plural}; set {THREADS_ENV} to choose"


def configure_cpu_threads(device: torch.device, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """On a CPU: set torch's threads for this process (cpu_thread_choice) and return the line to log,
    with advice when the machine is busier than its cores (other jobs: fewer threads often run much
    faster). On a GPU: nothing (None)."""
    if device.type != "cpu":
        return None
    environ = os.environ if environ is None else environ
    cores = available_cores()
    threads, why = cpu_thread_choice(environ, cores, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    message = f"CPU threads: {threads} per process ({why})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if threads > 1 and load > cores:
        message += (f"; the machine is busy (load {load:.1f} on {cores} cores): if steps are slow, "
                    f"try {THREADS_ENV}=1")
    return message
