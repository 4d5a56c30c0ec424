"""Representation alignment (REPA, Yu et al. 2025; sihyun-yu/REPA) as a loss term (sit.training.terms): the
tokens after SiT block k, through a trained MLP projector (its head, saved in the checkpoint's extras["repa"],
never in the SiT's state dict), are pulled toward a frozen encoder's patch tokens of the clean image:

    loss = denoising loss + coeff * mean over tokens of -cos(projector(h_k), encoder tokens)
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sit.cli import non_negative_float, positive_int
from sit.config import LOCKED, RUN_CHANGE, Rule, Setting
from sit.declarations import Needs, declare
from sit.distributed import agree
from sit.encoders import VisionEncoder, canonical_encoder_name, describe_encoder, load_encoder, looks_like_path
from sit.errors import UsageError
from sit.training.extensions import Feature
from sit.training.terms import LossTerm, StepView, TermContext, TermFactory

ALIGN_LOSS = "Align Loss"  # its name in log.txt (and "align loss" in wandb)


REPA_CONFLICT = ("{flag} {given} but {source} was trained with {flag} {held}; alignment cannot be switched on or "
                 "off in a resumed run: start a new experiment")
REPA_WARNING = "{flag} {given} replaces the checkpoint's {held}: the projector was trained against the other encoder"
ALIGNING = Needs("--repa-encoder", lambda settings: settings.enabled)


@dataclass(frozen=True)
class RepaSettings:
    """Representation alignment (train.py's REPA flags); repa_encoder None: off."""
    TITLE: ClassVar[str] = "representation alignment (REPA; sit/training/repa.py)"
    DDP_ONLY: ClassVar[tuple[str, str]] = ("--repa-encoder", "REPA's projector is not sharded")
    repa_encoder: Optional[str] = declare(
        None, "align block --repa-depth with this frozen encoder's patch tokens: dinov2-vit-s/b/l/g, "
              "dinov2_vitb14[_reg], a timm ViT name, or a local weights file/timm folder (default: off)",
        canonical=canonical_encoder_name, resume=Setting(Rule.WARN, conflict=REPA_CONFLICT, warning=REPA_WARNING,
                       incompatible=lambda given, held: (given is None) != (held is None)))
    repa_depth: int = declare(8, "the block (1-based) whose tokens are aligned", type=positive_int, resume=LOCKED,
                              needs=ALIGNING)
    repa_coeff: float = declare(0.5, "weight of the alignment loss", type=non_negative_float, resume=RUN_CHANGE,
                                needs=ALIGNING)
    repa_projector_dim: int = declare(2048, "hidden width of the projector MLP", type=positive_int, resume=LOCKED,
                                      needs=ALIGNING)

    @property
    def enabled(self) -> bool:
        return self.repa_encoder is not None

    def folder_tag(self) -> Optional[str]:
        """The experiment folder's mark: repa<block>."""
        return f"repa{self.repa_depth}" if self.enabled else None

    @property
    def token_encoder(self) -> Optional[str]:
        """The encoder whose tokens cached latents must hold (--feature-path), or None."""
        return self.repa_encoder

    def check(self, config: Any) -> None:
        """UsageError (one line naming the flag) for settings REPA cannot train with."""
        if not self.enabled:
            return
        if config.data.feature_path is None:
            describe_encoder(self.repa_encoder).input_size(config.model.image_size)
        else:  # cached latents carry the tokens: of the encoder's shape for these images
            check_cached_tokens(self.repa_encoder, config.data.feature_path, config.model.image_size)
        depth = config.model.sit_kwargs()["depth"]
        if not 1 <= self.repa_depth <= depth:
            raise UsageError(f"--repa-depth {self.repa_depth} is beyond the model's {depth} blocks (1..{depth})")


def check_cached_tokens(encoder: str, feature_path: str, image_size: int) -> None:
    """UsageError when a feature folder's tokens of `encoder` (meta.json's repa_tokens_shape [T, D]) are not
    the encoder's for images of image_size; nothing is checked where the data checks speak instead, nor for
    an encoder this machine cannot describe."""
    from sit.data.features import read_meta

    meta = read_meta(feature_path)
    if meta is None or meta["image_size"] != image_size or meta.get("repa_encoder") != encoder:
        return
    if looks_like_path(encoder) and not os.path.exists(encoder):
        return
    try:
        spec = describe_encoder(encoder)
    except UsageError:  # a name this machine cannot describe: training from its tokens never needs it
        return
    side = spec.input_size(image_size) // spec.patch_size
    expected, held = [side * side, spec.embed_dim], list(meta["repa_tokens_shape"])
    if held != expected:
        raise UsageError(f"--feature-path {feature_path} holds --repa-encoder tokens of shape {held} (tokens, width) "
                         f"but {encoder} gives {expected} for {image_size}px images ({side}x{side} patches of "
                         f"{spec.embed_dim} dims): run extract_features.py --repa-encoder {encoder} into a new "
                         f"--features-path")


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
    """Per-sample REPA loss (N,): the mean over tokens of -cos(projected (N, T, D), targets (N, T', D)
    resampled to T), in fp32, normalised with F.normalize as REPA."""
    targets = match_token_grid(targets, projected.shape[1]).float()
    cosine = (F.normalize(projected.float(), dim=-1) * F.normalize(targets, dim=-1)).sum(dim=-1)  # (N, T)
    return -cosine.mean(dim=1)


class RepaTerm(LossTerm):
    """REPA as a loss term: the projector is its head on block `block`'s tokens; the targets are the
    encoder's tokens of the clean images, or with cached latents the batch's stored tokens (inputs[2])."""
    name = "repa"

    def __init__(self, hidden_size: int, settings: RepaSettings, encoder_dim: int,
                 encoder: Optional[VisionEncoder] = None):
        super().__init__()
        self.block, self.weight = settings.repa_depth, settings.repa_coeff
        self.projector = build_projector(hidden_size, settings.repa_projector_dim, encoder_dim)
        self.encoder = encoder  # frozen and not an nn.Module: neither trained nor stored

    def batch_inputs(self, inputs: Sequence[torch.Tensor], device: torch.device, precision: str) -> torch.Tensor:
        """Encoder tokens (N, T, D) of the batch's images (N, 3, H, W) in [-1, 1], or the cached tokens."""
        if self.encoder is None:
            return inputs[2].to(device, non_blocking=True).float()
        return self.encoder.patch_tokens(inputs[0].to(device, non_blocking=True), precision)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.projector(hidden)  # (N, T, D) -> (N, T, encoder dim)

    def losses(self, view: StepView) -> dict[str, torch.Tensor]:
        return {ALIGN_LOSS: alignment_loss(view.head, view.inputs)}


def setup_repa(repa: RepaSettings, context: TermContext) -> Optional[TermFactory]:
    """How to build the run's REPA term for a SiT (None without --repa-encoder); without cached tokens every
    rank loads the encoder here (one failure stops all ranks)."""
    if not repa.enabled:
        return None
    ctx = context.ctx
    if context.feature_meta is not None:
        encoder, encoder_dim = None, context.feature_meta["repa_tokens_shape"][1]
    else:
        encoder = agree(ctx, functools.partial(load_encoder, repa.repa_encoder, context.image_size, ctx.device))
        encoder_dim = encoder.embed_dim
    context.logger.info(f"Representation alignment: block {repa.repa_depth} to {repa.repa_encoder} ({encoder_dim}-dim "
                        f"tokens{', cached' if encoder is None else ''}), coefficient {repa.repa_coeff}")
    return lambda sit: RepaTerm(sit.config["hidden_size"], repa, encoder_dim, encoder)


FEATURE = Feature("repa", RepaSettings, term=setup_repa)
