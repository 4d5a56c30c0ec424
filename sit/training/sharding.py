"""How training spreads the weights over the ranks (--sharding): the one place that knows DDP from FSDP2.
ddp: every rank keeps the whole model, gradients, AdamW state and EMA; fsdp: FSDP2 shards each (and the
EMA) block by block. Checkpoints hold the same full state dicts in both modes (gathered to rank 0's CPU,
the optimizer state keyed by parameter index), so either mode resumes the other's exactly."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from models import SiT
from sit.distributed import DistContext, is_distributed

SHARDINGS = ("ddp", "fsdp")  # --sharding choices
GATHER_TO_RANK_0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors on rank 0's CPU, {} elsewhere
GATHER_EVERYWHERE = StateDictOptions(full_state_dict=True)  # full tensors on every rank, on its device


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself when it is not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (e.g. a gradient norm reduced over the shards), as a plain tensor."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def broadcast_weights(model: nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers (what DDP does when it wraps a model): each
    rank initialised its own model from its own seed, and a shard must come from one model."""
    if is_distributed():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def indexed_optimizer_state(model: nn.Module, named: dict) -> dict:
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's) as `Optimizer.state_dict()`
    keys it: by index in `model.parameters()` order. {} stays {} (ranks without the gathered state)."""
    if not named:
        return {}
    index = {name: position for position, (name, _) in enumerate(model.named_parameters())}
    state = {index[name]: value for name, value in named["state"].items()}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in named["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def named_optimizer_state(model: nn.Module, indexed: dict) -> dict:
    """The inverse of indexed_optimizer_state: numbered parameters back to their names."""
    names = [name for name, _ in model.named_parameters()]
    state = {names[position]: value for position, value in indexed["state"].items()}
    groups = [{**group, "params": [names[position] for position in group["params"]]} for group in indexed["param_groups"]]
    return {"state": state, "param_groups": groups}


def plain_sit(config: dict, state: dict, device: torch.device) -> SiT:
    """An unsharded SiT in eval mode holding `state`, on device. Built on the meta device, so it
    draws no random numbers (the training RNG streams stay those of a run without it)."""
    with torch.device("meta"):
        model = SiT(**config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).requires_grad_(False).eval()


@dataclass(frozen=True)
class Sharding:
    """--sharding and the --precision it runs at: how the step's model, EMA and AdamW are laid out."""
    mode: str = "ddp"
    precision: str = "fp32"

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def mixed_precision(self, root: bool) -> MixedPrecisionPolicy:
        """bf16: gathered weights in bf16, gradients reduced in fp32; otherwise all fp32. The root
        keeps its inputs as they are: the time t reaches the timestep embedding in fp32, as with DDP."""
        if self.precision != "bf16":
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=not root)

    def wrap(self, model: nn.Module, ctx: DistContext) -> nn.Module:
        """What the training step calls. ddp: the model in DDP (several processes) or itself (one).
        fsdp: the model itself once every rank holds rank 0's weights; `shard` splits it (with its EMA)."""
        if not self.sharded:
            return DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None) if is_distributed() else model
        broadcast_weights(model)
        return model

    def shard(self, model: nn.Module, ema: nn.Module) -> None:
        """fsdp: fully_shard each block, then the root, of the model and its EMA (before compile, AdamW)."""
        if not self.sharded:
            return
        # SiT.forward returns a view (the velocity half of the learn_sigma output); FSDP2 warns that an
        # in-place op on it would skip a hook. Transport.training_losses uses it out of place only.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPSiT\) returned a view tensor")
        for module, policy in ((model, self.mixed_precision), (ema, lambda root: MixedPrecisionPolicy())):
            for block in module.blocks:
                fully_shard(block, mp_policy=policy(False))
            fully_shard(module, mp_policy=policy(True))

    def full_state_dicts(self, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
        """(model, EMA, AdamW) state dicts as a checkpoint stores them. fsdp: gathered to rank 0's
        CPU ({} on the other ranks), so every rank must call this (a collective)."""
        if not self.sharded:
            return model.state_dict(), ema.state_dict(), opt.state_dict()
        model_state = get_model_state_dict(model, options=GATHER_TO_RANK_0)
        ema_state = get_model_state_dict(ema, options=GATHER_TO_RANK_0)
        named = get_optimizer_state_dict(model, opt, options=GATHER_TO_RANK_0)
        return model_state, ema_state, indexed_optimizer_state(model, named)

    def load_optimizer(self, model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
        """Restore AdamW from a checkpoint's (full, index-keyed) state; fsdp: each rank keeps its shards."""
        if not self.sharded:
            opt.load_state_dict(state)
            return
        set_optimizer_state_dict(model, opt, named_optimizer_state(model, state),
                                 options=StateDictOptions(full_state_dict=True))
        for group, saved in zip(opt.param_groups, state["param_groups"]):  # as Optimizer.load_state_dict
            group.update({key: value for key, value in saved.items() if key != "params"})  # (betas stay a tuple)


def sampling_ema(ema: Optional[nn.Module], device: torch.device, everywhere: bool) -> Optional[nn.Module]:
    """An unsharded EMA to sample from: an FSDP2 one gathered into a plain copy (a collective; to rank 0
    only unless everywhere, None elsewhere), any other as it is."""
    if not isinstance(ema, FSDPModule):
        return ema
    state = get_model_state_dict(ema, options=GATHER_EVERYWHERE if everywhere else GATHER_TO_RANK_0)
    return plain_sit(ema.config, state, device) if state else None
