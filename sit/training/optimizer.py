"""The optimizer, the fp16 loss scaler and the EMA of the weights (what previews, FID and sampling use)."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from sit.training.sharding import local_tensor


def make_optimizer(model: torch.nn.Module, lr: float = 1e-4, weight_decay: float = 0.0,
                   extra: Iterable[torch.nn.Parameter] = (), groups: Sequence[dict] = ()) -> torch.optim.Optimizer:
    """The paper's AdamW, fused on GPUs, multi-tensor elsewhere. Every parameter, the frozen pos_embed too,
    so that the state's indices match the original's checkpoints; `extra` (loss terms') follow in the same
    group, `groups` (terms with their own options: {"params": [...], "lr": ...}) as groups of their own."""
    main = list(model.parameters()) + list(extra)
    on_gpu = all(param.is_cuda for group in [main, *(group["params"] for group in groups)] for param in group)
    return torch.optim.AdamW([{"params": main}, *groups], lr=lr, weight_decay=weight_decay, fused=on_gpu,
                             foreach=not on_gpu)


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float = 0.9999) -> None:
    """ema = decay * ema + (1 - decay) * model for every parameter (the frozen pos_embed too, as the
    original), with fused multi-tensor ops; FSDP-sharded models update shard by shard."""
    model_params = dict(model.named_parameters())
    ema_params = dict(ema_model.named_parameters())
    names = list(model_params)
    targets = [local_tensor(ema_params[name]) for name in names]
    torch._foreach_mul_(targets, decay)  # the original's arithmetic: ema * decay + param * (1 - decay)
    current = [local_tensor(model_params[name].detach()) for name in names]
    torch._foreach_add_(targets, current, alpha=1 - decay)
