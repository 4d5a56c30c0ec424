"""Numeric precision, compilation and CPU threads: the --precision and --compile flags' meaning (with
`--precision auto`'s choice from the hardware), and how many threads a CPU process runs, in one place."""
from __future__ import annotations

import contextlib
import os
import timeit
from typing import AbstractSet, Mapping, Optional

import torch

# --precision choice -> autocast dtype (None: no autocast). tf32 is fp32 storage with TF32 matmuls.
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"  # --precision auto: resolved by resolve_precision_choice before anything reads the choice
PRECISION_CHOICES = [*PRECISIONS, AUTO]
CPUINFO = "/proc/cpuinfo"


def cpu_flags(path: str = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere or when unreadable)."""
    with contextlib.suppress(OSError), open(path) as handle:
        for line in handle:
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    return frozenset()


def bf16_matrix_units(flags: AbstractSet[str]) -> Optional[str]:
    """The CPU's bf16 matrix units by its flags: "AMX" (tiles with bf16), "AVX512-BF16", or None."""
    if {"amx_bf16", "amx_tile"} <= flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


def resolve_precision_choice(precision: str, device_type: str, flags: Optional[AbstractSet[str]] = None) -> str:
    """A --precision value with auto replaced by its choice: bf16 on a CPU with bf16 matrix units (flags: this
    CPU's unless given), fp32 on other CPUs, tf32 on GPUs."""
    if precision != AUTO:
        return precision
    if device_type == "cuda":
        return "tf32"
    return "bf16" if bf16_matrix_units(cpu_flags() if flags is None else flags) else "fp32"


def default_device_type() -> str:
    """The device the scripts run on when nothing else says (sit.distributed's choice): cuda if any."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def matmul_speedup(size: int = 512, repeats: int = 3) -> float:
    """How much faster a (size x size) bf16 matmul runs than an fp32 one on this CPU (best of repeats;
    inputs from a private generator: the global random streams are untouched)."""
    generator = torch.Generator().manual_seed(0)
    a32, b32 = (torch.randn(size, size, generator=generator) for _ in range(2))
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = a32.to(dtype), b32.to(dtype)
        torch.mm(a, b)  # first call: oneDNN's kernel choice
        best[dtype] = min(timeit.repeat(lambda: torch.mm(a, b), repeat=repeats, number=1))
    return best[torch.float32] / best[torch.bfloat16]


def precision_advice(precision: str, device: torch.device, flags: Optional[AbstractSet[str]] = None,
                     speedup: Optional[float] = None) -> Optional[str]:
    """On a CPU, the line to log: its bf16 matrix units, a bf16/fp32 matmul measured now, and the advice
    (speedup: the measured ratio, given by tests). On a GPU: None."""
    if device.type != "cpu":
        return None
    units = bf16_matrix_units(cpu_flags() if flags is None else flags)
    speedup = matmul_speedup() if speedup is None else speedup
    found = f"bf16 matrix units {units}" if units else "no bf16 matrix units (AMX / AVX512-BF16)"
    if speedup >= 1.2:
        advice = "bf16 matmuls are faster here"
        advice += "" if precision == "bf16" else ": --precision bf16 (or auto) uses them"
    else:
        advice = "bf16 does not pay here" + ("" if precision != "bf16" else ": --precision fp32 is as fast and exact")
    return f"CPU: {found}; a bf16 matmul runs {speedup:.1f}x fp32 here; {advice}"


def configure_precision(precision: str) -> None:
    """Set the global matmul precision flags for a --precision choice (TF32 only on GPUs)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"


def autocast(precision: str, device: torch.device):
    """The autocast context of a --precision choice: bf16/fp16 (parameters stay fp32), else a no-op."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile every SiT block in place (static shapes; docs/speed.md says why blocks) and return the
    model. Compile after any deepcopy (e.g. the EMA): a copy would keep calling the original's blocks."""
    for block in model.blocks:
        block.compile(dynamic=False)
    return model


def compile_for_sampling(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile the whole forward for inference, the weights frozen into the graph and, on CPU, kernels
    autotuned (docs/speed.md); only for weights that no longer change (training uses compile_model)."""
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
    """On a CPU: set torch's threads for this process (cpu_thread_choice) and return the line to log, with
    advice when the machine is busier than its cores. On a GPU: None."""
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
