"""Representation alignment (REPA, Yu et al. 2025; sihyun-yu/REPA): the tokens after SiT block k,
through a trained MLP projector, are pulled toward a frozen encoder's patch tokens of the clean image.

    loss = denoising loss + coeff * mean over tokens of -cos(projector(h_k), encoder tokens)

The projector (REPA's build_mlp: Linear, SiLU, Linear, SiLU, Linear from the SiT width through
--repa-projector-dim to the encoder width) trains with the model and is saved in the checkpoint
beside it, never inside the SiT's state dict: sampling loads the SiT alone. The encoder's token grid
is interpolated to the SiT's when they differ (area averages or bilinear; DINOv2 at 224/256 of a
256 px image has SiT-XL/2's 16 x 16 grid, so REPA's recipe needs none).
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sit.distributed import DistContext, agree
from sit.encoders import VisionEncoder, load_encoder
from transport import Transport

if TYPE_CHECKING:
    from sit.training.settings import RepaSettings


ALIGN_LOSS = "Align Loss"  # its name in log.txt (and "align loss" in wandb)


def build_projector(hidden_size: int, projector_dim: int, encoder_dim: int) -> nn.Sequential:
    """REPA's 3-layer MLP (N, T, hidden_size) -> (N, T, encoder_dim), initialised as REPA's SiT
    initialises its linears (xavier-uniform weights, zero biases)."""
    projector = nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                              nn.SiLU(), nn.Linear(projector_dim, encoder_dim))
    for layer in projector:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return projector


class AlignedSiT(nn.Module):
    """The SiT and its projector as the one module that DDP wraps (so that both gradients are reduced):
    forward(x, t, y) -> (the SiT's output (N, C, H, W), projected block-`depth` tokens (N, T, encoder dim))."""

    def __init__(self, sit: nn.Module, projector: nn.Module, depth: int):
        super().__init__()
        self.sit = sit
        self.projector = projector
        self.depth = depth

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output, hidden = self.sit(x, t, y, hidden_at=self.depth)  # hidden: (N, T, D)
        return output, self.projector(hidden)


def match_token_grid(tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Encoder tokens (N, T, D) on a square grid, resampled to a square grid of num_tokens tokens
    (area averages when shrinking, bilinear when growing); unchanged when the grids agree."""
    count, side, target = tokens.shape[1], math.isqrt(tokens.shape[1]), math.isqrt(num_tokens)
    if count == num_tokens:
        return tokens
    if side * side != count or target * target != num_tokens:
        raise ValueError(f"token grids must be square to be matched, got {count} and {num_tokens} tokens")
    batch, _, width = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, width, side, side)                  # (N, D, h, w)
    # shrinking averages the encoder tokens that each SiT token covers; growing interpolates bilinearly
    grid = F.interpolate(grid, size=(target, target), mode="area" if target < side else "bilinear")
    return grid.flatten(2).transpose(1, 2)                                             # (N, target^2, D)


def alignment_loss(projected: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample REPA loss: the mean over tokens of the negative cosine similarity, in fp32.

    projected: (N, T, D) the projector's tokens; targets: (N, T', D) encoder tokens (resampled to T).
    Returns (N,) in [-1, 1]; REPA normalises both with F.normalize (eps 1e-12) and sums the products.
    """
    targets = match_token_grid(targets, projected.shape[1]).float()
    cosine = (F.normalize(projected.float(), dim=-1) * F.normalize(targets, dim=-1)).sum(dim=-1)  # (N, T)
    return -cosine.mean(dim=1)


@dataclass
class Alignment:
    """REPA in a training step: the coefficient, the block, the encoder's token width, and where the
    tokens come from (the encoder, or with cached latents the features' stored tokens)."""
    coeff: float
    depth: int
    encoder_dim: int
    encoder: Optional[VisionEncoder] = None  # None: tokens come with the batch (--feature-path)

    def targets(self, images_or_tokens: torch.Tensor, precision: str) -> torch.Tensor:
        """Encoder tokens (N, T, D) of a batch: the images' (N, 3, H, W) in [-1, 1] through the
        encoder, or the cached tokens themselves."""
        if self.encoder is None:
            return images_or_tokens.float()
        return self.encoder.patch_tokens(images_or_tokens, precision)

    def losses(self, transport: Transport, aligned_model: Callable, latents: torch.Tensor, labels: torch.Tensor,
               targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(denoising loss, alignment loss), each (N,), of one forward of the aligned model (an
        AlignedSiT, or DDP around one). The transport draws noise and t exactly as without REPA."""
        captured = {}

        def output_only(x, t, **kwargs):
            output, captured["projected"] = aligned_model(x, t, **kwargs)
            return output

        denoising = transport.training_losses(output_only, latents, dict(y=labels))["loss"]
        return denoising, alignment_loss(captured["projected"], targets)


def prepare_alignment(repa: "RepaSettings", image_size: int, feature_meta: Optional[dict], ctx: DistContext,
                      logger: logging.Logger) -> Optional[Alignment]:
    """The run's Alignment (None without --repa-encoder): with cached latents (feature_meta, the
    features' meta.json) the tokens come with the batches; otherwise every rank loads the encoder
    (one failure stops all ranks with one line)."""
    if not repa.enabled:
        return None
    if feature_meta is not None:
        encoder, encoder_dim = None, feature_meta["repa_tokens_shape"][1]
    else:
        encoder = agree(ctx, functools.partial(load_encoder, repa.repa_encoder, image_size, ctx.device))
        encoder_dim = encoder.embed_dim
    logger.info(f"Representation alignment: block {repa.repa_depth} to {repa.repa_encoder} ({encoder_dim}-dim tokens"
                f"{', cached' if encoder is None else ''}), coefficient {repa.repa_coeff}")
    return Alignment(repa.repa_coeff, repa.repa_depth, encoder_dim, encoder)
