"""The optimizer and the fp16 loss scaler of training."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch


def make_optimizer(model: torch.nn.Module, lr: float = 1e-4, weight_decay: float = 0.0,
                   extra: Iterable[torch.nn.Parameter] = (), groups: Sequence[dict] = ()) -> torch.optim.Optimizer:
    """The paper's AdamW (constant lr 1e-4, no weight decay: the defaults), fused on GPUs, multi-tensor
    elsewhere; weight_decay (--weight-decay) is AdamW's decoupled decay, for every group that sets none.

    All parameters are handed over, the frozen pos_embed included (AdamW skips it), so that the
    state's parameter indices match the original's checkpoints; `extra` ones (loss terms', e.g. the
    REPA projector's) come after them, in the same group; `groups` (loss terms with their own AdamW
    options: {"params": [...], "lr": ...}) follow as groups of their own.
    """
    main = list(model.parameters()) + list(extra)
    on_gpu = all(param.is_cuda for group in [main, *(group["params"] for group in groups)] for param in group)
    return torch.optim.AdamW([{"params": main}, *groups], lr=lr, weight_decay=weight_decay, fused=on_gpu,
                             foreach=not on_gpu)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that scales the loss for fp16 and is a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
