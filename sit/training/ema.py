"""The exponential moving average of the weights that previews, FID and sampling use."""
from __future__ import annotations

import torch

from sit.training.dtensors import local_tensor


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float = 0.9999) -> None:
    """ema = decay * ema + (1 - decay) * model, for every parameter, with fused multi-tensor ops.

    As the original, the frozen pos_embed takes part too (it is equal in both, so it stays put).
    FSDP-sharded models (sharded alike) update shard by shard, each rank its own part.
    """
    model_params = dict(model.named_parameters())
    ema_params = dict(ema_model.named_parameters())
    names = list(model_params)
    targets = [local_tensor(ema_params[name]) for name in names]
    torch._foreach_mul_(targets, decay)  # the original's arithmetic: ema * decay + param * (1 - decay)
    torch._foreach_add_(targets, [local_tensor(model_params[name].detach()) for name in names], alpha=1 - decay)
