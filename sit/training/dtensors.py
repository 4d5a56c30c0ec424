"""Plain tensors from FSDP2's DTensors: the two helpers that the EMA, the loss monitor and the step
need without knowing how the weights are laid out (sit.training.sharding does the laying out)."""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself when it is not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (e.g. a gradient norm reduced over the shards), as a plain tensor."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
