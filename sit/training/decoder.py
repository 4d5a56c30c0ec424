"""The VAE a training run holds, and when it is loaded.

--data-path: every rank loads it at the start (training encodes each batch with it); --vae none:
there is none (the model's outputs are pixels); --feature-path: none at the start, so a run without
previews or FID never holds one: rank 0 loads it for the first preview grid (without one: a
warning, no grids), every rank at the first FID measurement.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from sit.distributed import DistContext, agree
from sit.errors import UsageError
from sit.vae import is_pixel_space, load_vae


def load_vae_on_all_ranks(ctx: DistContext, name: str, loaded: Any = None) -> Any:
    """load_vae on every rank (None for pixel space); if any rank fails, every rank stops (rather than
    wait for it at the next collective). loaded: a VAE this rank already holds, kept (it still joins)."""
    if is_pixel_space(name):
        return None
    return agree(ctx, lambda: loaded if loaded is not None else load_vae(name, ctx.device))


@dataclass
class RunVAE:
    """The run's VAE (`module`; None while not loaded or for pixels) named by --vae; `lazy`: --feature-path."""
    name: str
    device: torch.device
    lazy: bool = False
    module: Any = None
    on_every_rank: bool = False  # lazy: every rank holds it (since the first FID measurement)
    preview_failed: bool = False  # lazy: rank 0 could not load it for the previews

    @classmethod
    def at_start(cls, ctx: DistContext, name: str, from_features: bool) -> "RunVAE":
        """The VAE as training starts: loaded on every rank unless from_features (or pixel space)."""
        if from_features:
            return cls(name, ctx.device, lazy=True)
        return cls(name, ctx.device, module=load_vae_on_all_ranks(ctx, name))

    def for_preview(self, logger: logging.Logger) -> tuple[bool, Any]:
        """Rank 0: (whether a preview grid can be made, its decoder or None for pixels)."""
        if not self.lazy or self.module is not None:
            return True, self.module
        if self.preview_failed:
            return False, None
        try:  # loaded only now, on rank 0 only: a run with no preview never holds a VAE
            self.module = load_vae(self.name, self.device)
        except UsageError as error:
            self.preview_failed = True
            logger.warning(f"warning: no preview grids: {error}")
            return False, None
        return True, self.module

    def for_fid(self, ctx: DistContext) -> Optional[Any]:
        """Every rank: the decoder of FID samples (None for pixels). Lazily, every rank loads it at the
        first call; rank 0 keeps a preview VAE it holds but still joins the check, so that every rank
        takes part in the same collectives."""
        if self.lazy and not self.on_every_rank:
            self.module = load_vae_on_all_ranks(ctx, self.name, loaded=self.module)
            self.on_every_rank = True
        return self.module
