"""Numeric precision and compilation: the --precision and --compile flags' meaning, in one place."""
from __future__ import annotations

import contextlib

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
