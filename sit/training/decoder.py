"""The latent space a training run holds, and when its network is loaded: --data-path, every rank at the
start; --vae none, never; --feature-path, rank 0 at the first preview grid and every rank at the first FID
measurement (a run without either never holds one). With --latent-norm per-channel it normalises by the
measured statistics (`run_latent_statistics`), which the checkpoints carry.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from sit.distributed import DistContext, agree
from sit.errors import UsageError
from sit.latents import PIXEL_SPACE, LatentSpace, load_latent_space, recorded_latent_space
from sit.latents.statistics import CONSTANT, PER_CHANNEL, LatentStatistics, same_latents


def load_on_all_ranks(ctx: DistContext, name: str, loaded: Any = None) -> Optional[LatentSpace]:
    """load_latent_space on every rank (None for pixel space); if any rank fails, every rank stops (rather
    than wait for it at the next collective). loaded: a space this rank already holds, kept (it still joins)."""
    if name == PIXEL_SPACE:
        return None
    return agree(ctx, lambda: loaded if loaded is not None else load_latent_space(name, ctx.device))


def run_latent_statistics(model: Any, feature_path: Optional[str], feature_meta: Optional[Mapping[str, Any]],
                          checkpoint: Optional[Mapping[str, Any]], stored: Optional[Mapping[str, Any]] = None
                          ) -> Optional[LatentStatistics]:
    """The statistics a run normalises with (None: --latent-norm constant): a resumed checkpoint's, else
    --feature-path's (feature_meta). UsageError when missing, unusable or of another space than --vae's."""
    held_norm = (stored or {}).get("latent_norm", CONSTANT) if checkpoint is not None else model.latent_norm
    if held_norm != model.latent_norm:  # an older checkpoint records none: it learned constant-scaled latents
        raise UsageError(f"--latent-norm {model.latent_norm} but the checkpoint's model learned {held_norm}-normalised "
                         f"latents: drop --latent-norm or start a new experiment")
    if model.latent_norm != PER_CHANNEL:
        return None
    if checkpoint is not None and checkpoint.get("latent_statistics") is not None:
        held, where = (stored or {}).get("vae"), "the checkpoint"
        statistics = LatentStatistics.from_dict(checkpoint["latent_statistics"], where, "start a new experiment")
    elif feature_meta is not None:
        held, where = feature_meta["vae"], f"--feature-path {feature_path}"
        statistics = LatentStatistics.from_dict(
            feature_meta.get("latent_statistics"), where, "run extract_features.py again with the same flags (it "
            "measures them once every block is done), or train with --latent-norm constant",
            channels=feature_meta["latent_shape"][0])
    else:
        raise UsageError("--latent-norm per-channel takes the latents' statistics from --feature-path "
                         "(extract_features.py measures them): train from cached features, or use --latent-norm constant")
    if isinstance(held, str) and not same_latents(model.vae, held):
        raise UsageError(f"--vae {model.vae} but the per-channel statistics of {where} are of {held}'s latents: "
                         f"drop --vae, or measure features of {model.vae}")
    return statistics


@dataclass
class RunVAE:
    """The run's latent space named by --vae (`module`: None for pixels), loaded unless `lazy`
    (--feature-path) and not needed yet (`loaded`)."""
    name: str
    device: torch.device
    lazy: bool = False
    module: Any = None
    loaded: bool = False
    on_every_rank: bool = False  # lazy: every rank holds it loaded (since the first FID measurement)
    preview_failed: bool = False  # lazy: rank 0 could not load it for the previews
    statistics: Optional[LatentStatistics] = None  # --latent-norm per-channel: what every module normalises with

    def __post_init__(self) -> None:
        self.module = self.measured(self.module)

    def measured(self, space: Optional[LatentSpace]) -> Optional[LatentSpace]:
        """space, normalising with the run's statistics when it has them."""
        if space is not None and self.statistics is not None:
            space.use_normalisation(self.statistics.normalisation())
        return space

    @classmethod
    def at_start(cls, ctx: DistContext, name: str, from_features: bool,
                 statistics: Optional[LatentStatistics] = None) -> "RunVAE":
        """The latent space as training starts: loaded on every rank unless from_features (or pixel space)."""
        if from_features:  # not loaded: a recorded folder need not exist until a preview decodes
            return cls(name, ctx.device, lazy=True, module=recorded_latent_space(name), statistics=statistics)
        return cls(name, ctx.device, module=load_on_all_ranks(ctx, name), loaded=True, statistics=statistics)

    def for_preview(self, logger: logging.Logger) -> tuple[bool, Any]:
        """Rank 0: (whether a preview grid can be made, its latent space or None for pixels)."""
        if not self.lazy or self.loaded:
            return True, self.module
        if self.preview_failed:
            return False, None
        try:  # loaded only now, on rank 0 only: a run with no preview never holds a VAE
            self.module = self.measured(load_latent_space(self.name, self.device))
        except UsageError as error:
            self.preview_failed = True
            logger.warning(f"warning: no preview grids: {error}")
            return False, None
        self.loaded = True
        return True, self.module

    def for_fid(self, ctx: DistContext) -> Optional[Any]:
        """Every rank: the latent space that decodes FID samples (None for pixels), loaded at the first call
        (rank 0 keeps one loaded for previews but still joins the collective)."""
        if self.lazy and not self.on_every_rank:
            self.module = self.measured(load_on_all_ranks(ctx, self.name, loaded=self.module if self.loaded else None))
            self.loaded = self.on_every_rank = True
        return self.module
