"""Loss terms: training objectives beside the transport's loss, one module each (REPA's alignment is one).
A `LossTerm` is an `nn.Module` trained with the model: `batch_inputs` outside autograd, `head(hidden)` on a
block's tokens inside the wrapped forward (so DDP reduces its gradients), `losses(view)` per sample by name,
weighted by `weight`; AdamW holds its parameters, the checkpoint its state under `extras[name]`."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from sit.distributed import DistContext


@dataclass
class StepView:
    """What a loss term sees of one training step: the model's output (N, C, H, W) at input x_t, times t (N,),
    target (the path's velocity at (x_t, t)), the clean latents (N, C, H, W), labels (N,), its head's output
    (None without a block) and what its `batch_inputs` returned."""
    output: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    latents: torch.Tensor
    labels: torch.Tensor
    head: Optional[torch.Tensor] = None
    inputs: Any = None


class LossTerm(nn.Module):
    """An extra training objective (see the module docstring). Subclasses set `name` and implement `losses`."""
    name: str = ""
    block: Optional[int] = None  # 1-based block whose tokens (N, T, D) reach `head`; None: no tokens
    weight: float = 1.0
    optimizer_options: dict = {}  # AdamW options of its own parameter group (e.g. {"lr": 1e-3}); {}: the SiT's group

    def batch_inputs(self, inputs: Sequence[torch.Tensor], device: torch.device, precision: str) -> Any:
        """What the term needs of a batch's inputs (the loader's tensors before the labels), without gradients."""
        return None

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The term's trained map of the block's tokens (N, T, D); runs inside the wrapped model's forward."""
        return hidden

    def losses(self, view: StepView) -> dict[str, torch.Tensor]:
        """Per-sample losses (N,) by the name they are logged under."""
        raise NotImplementedError

    def sharding_refusal(self) -> Optional[str]:
        """Why the term cannot run with --sharding fsdp (None: it can). Terms with parameters keep them
        whole on every rank unless they say otherwise."""
        return None if not any(True for _ in self.parameters()) else f"the {self.name} term's parameters are not sharded"


class ModelWithTerms(nn.Module):
    """The SiT and the loss terms' heads as the one module that DDP wraps (so that every gradient is
    reduced): forward(x, t, y) -> (the SiT's output (N, C, H, W), {term name: its head's output})."""

    def __init__(self, sit: nn.Module, terms: Sequence[LossTerm]):
        super().__init__()
        self.sit = sit
        self.terms = nn.ModuleList(terms)
        blocks = {term.block for term in terms if term.block is not None}
        if len(blocks) > 1:
            raise ValueError(f"loss terms ask for the tokens of blocks {sorted(blocks)}; one block per run is supported")
        self.block = blocks.pop() if blocks else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.block is None:
            return self.sit(x, t, y), {}
        output, hidden = self.sit(x, t, y, hidden_at=self.block)  # hidden: (N, T, D)
        return output, {term.name: term.head(hidden) for term in self.terms if term.block is not None}


def term_parameters(terms: Sequence[LossTerm], own_group: Optional[bool] = None) -> list[nn.Parameter]:
    """The terms' parameters in the order AdamW holds them (after the SiT's); own_group True/False: only
    those of terms with/without optimizer_options."""
    return [param for term in terms if own_group is None or bool(term.optimizer_options) == own_group
            for param in term.parameters()]


def in_optimizer_order(terms: Sequence[LossTerm]) -> list[LossTerm]:
    """Terms that join the SiT's AdamW group first, then those with a group of their own (stable), so that
    AdamW's parameter indices follow the terms in this order (and the checkpoint's extras with them)."""
    return sorted(terms, key=lambda term: bool(term.optimizer_options))


@dataclass
class TermContext:
    """What a loss term's setup may use: image size, cached latents' meta.json (or None), ranks, log."""
    image_size: int
    feature_meta: Optional[dict]
    ctx: DistContext
    logger: logging.Logger


class Objective:
    """The step's primary loss in place of the transport's (e.g. MeanFlow's, sit.training.meanflow): a
    feature's `objective` setup returns one (or None: the transport's loss, the original's)."""
    name: str = ""

    def losses(self, step: Any, latents: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(per-sample loss (N,), {name: per-sample values (N,) to log}) of latents (N, C, H, W) and labels
        (N,); step: the TrainStep (step.model raw, for torch.func; step.ddp_model for gradients)."""
        raise NotImplementedError


TermFactory = Callable[[nn.Module], LossTerm]  # the SiT -> its term (built after it, from the torch RNG)
