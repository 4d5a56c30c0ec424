"""Memory per GPU of a training run, DDP against FSDP2 (--sharding), without a GPU.

Model state comes from the parameter counts: fp32 weights, fp32 gradients, AdamW's two fp32 moments,
the fp32 EMA; DDP keeps all of it on every GPU (and, launched on several, a bucket copy of the
gradients for the all-reduce), FSDP keeps 1/world of each plus the blocks gathered in flight.
Activations are measured, not guessed: the model's forward runs on fake tensors (no memory, no
compute) and the tensors autograd saves for the backward are summed, autocast's low-precision copies
of the weights included. Not included: the backward's short-lived buffers (about one block's
activations at a time), the CUDA context and allocator fragmentation (together ~1-3 GiB on a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from models import SiT
from sit.speed import PRECISIONS, autocast

FP32_BYTES = 4
GATHERED_UNITS = 2  # FSDP2 holds the running block and the prefetched next one


@dataclass(frozen=True)
class ParameterCounts:
    """A SiT's parameters: all, those that learn (not pos_embed), the largest block's and the rest's (the root FSDP unit)."""
    total: int
    trainable: int
    block: int
    root: int

    @classmethod
    def of(cls, model_kwargs: dict) -> "ParameterCounts":
        with torch.device("meta"):  # shapes only
            model = SiT(**model_kwargs)
        block = max(sum(param.numel() for param in module.parameters()) for module in model.blocks)
        total = sum(param.numel() for param in model.parameters())
        trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
        return cls(total=total, trainable=trainable, block=block, root=total - block * len(model.blocks))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by what holds them."""
    weights: int
    gradients: int
    optimizer: int
    ema: int
    communication: int  # DDP's gradient buckets, or FSDP's gathered blocks and their unsharded gradients
    activations: int

    @property
    def total(self) -> int:
        return sum(getattr(self, field.name) for field in fields(self))


def state_memory(counts: ParameterCounts, world_size: int, sharding: str, precision: str) -> dict[str, int]:
    """Bytes per GPU of weights, gradients, AdamW state, EMA and communication buffers (see the module docstring)."""
    shards = world_size if sharding == "fsdp" else 1
    state = dict(weights=FP32_BYTES * counts.total // shards, gradients=FP32_BYTES * counts.trainable // shards,
                 optimizer=2 * FP32_BYTES * counts.trainable // shards, ema=FP32_BYTES * counts.total // shards)
    if sharding == "ddp":
        state["communication"] = FP32_BYTES * counts.trainable if world_size > 1 else 0  # no DDP in one process
    else:  # bf16: gathered in bf16, gradients in bf16 then reduced in fp32; otherwise all fp32
        gathered = 2 if precision == "bf16" else FP32_BYTES
        per_block = counts.block * (gathered + gathered + (FP32_BYTES if precision == "bf16" else 0))
        state["communication"] = GATHERED_UNITS * per_block + gathered * counts.root
    return state


def saved_tensor_bytes(run_forward: Callable[[], torch.Tensor], exclude: set[int]) -> int:
    """Bytes of the distinct storages that autograd saves for the backward while run_forward runs,
    skipping the storages in exclude (e.g. the parameters', counted elsewhere)."""
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        sizes[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run_forward()
    return sum(size for key, size in sizes.items() if key not in exclude)


def activation_memory(model_kwargs: dict, batch_size: int, precision: str, sharding: str,
                      grad_checkpointing: bool = False, fake: bool = True) -> int:
    """Bytes saved for the backward by one training forward of batch_size inputs (C, L, L) at a
    --precision (FSDP with bf16 runs bf16 weights, so autocast makes no copies of them); with
    grad_checkpointing, the block inputs plus one block's recomputed activations. fake=False runs
    real tensors on the CPU (the same count, for checking)."""
    def measure(checkpointing: bool) -> int:
        weights_dtype = torch.bfloat16 if sharding == "fsdp" and precision == "bf16" else torch.float32
        default_dtype = torch.get_default_dtype()
        with FakeTensorMode() if fake else torch.device("cpu"):
            torch.set_default_dtype(weights_dtype)  # built in that dtype (fake tensors cannot be converted)
            try:
                model = SiT(**model_kwargs).train()
            finally:
                torch.set_default_dtype(default_dtype)
            model.grad_checkpointing = checkpointing
            size, channels = model_kwargs["input_size"], model_kwargs["in_channels"]
            x = torch.randn(batch_size, channels, size, size)  # (N, C, L, L)
            t, y = torch.rand(batch_size), torch.randint(0, model_kwargs["num_classes"], (batch_size,))
            parameters = {param.untyped_storage()._cdata for param in model.parameters()}
            with autocast(precision, torch.device("cpu")):
                return saved_tensor_bytes(lambda: model(x, t, y), parameters)

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}")
    if not grad_checkpointing:
        return measure(False)
    one_block = (measure(False) - measure(True)) // model_kwargs["depth"]
    return measure(True) + one_block


def training_memory(model_kwargs: dict, world_size: int, sharding: str, precision: str, batch_size: int,
                    grad_checkpointing: bool = False) -> MemoryEstimate:
    """The memory per GPU of training a SiT (constructor arguments) at a local batch size."""
    state = state_memory(ParameterCounts.of(model_kwargs), world_size, sharding, precision)
    return MemoryEstimate(**state, activations=activation_memory(model_kwargs, batch_size, precision, sharding,
                                                                 grad_checkpointing))
