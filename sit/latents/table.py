"""Which latent spaces --vae names: the table, and the resolvers every user of a latent space goes through.

A new latent space is one module (a LatentSpace subclass) plus its entry in LATENT_SPACES; any other
--vae value that is an existing folder is a diffusers AutoencoderKL.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from sit.errors import UsageError
from sit.latents.autoencoder import UNNAMED, AutoencoderKLSpace
from sit.latents.pixels import PIXEL_SPACE, PixelSpace
from sit.latents.space import LatentSpace

# --vae value -> the space's class (built with that name); the order is the order error messages list them in
LATENT_SPACES: dict[str, type[LatentSpace]] = {
    "ema": AutoencoderKLSpace,   # stabilityai/sd-vae-ft-ema
    "mse": AutoencoderKLSpace,   # stabilityai/sd-vae-ft-mse
    PIXEL_SPACE: PixelSpace,     # "none": pixels
}
DEFAULT_LATENT_SPACE = "ema"  # train.py's --vae default, and what a record without a VAE is taken to be


def _is_pixels(name: str) -> bool:
    return name in LATENT_SPACES and LATENT_SPACES[name].pixel_space


def check_latent_space_name(name: str, flag: str = "--vae", allow_pixels: bool = True) -> None:
    """A table entry or a local diffusers folder (pixels only if allow_pixels): else a UsageError naming the choices."""
    if (name in LATENT_SPACES and (allow_pixels or not _is_pixels(name))) or os.path.isdir(name):
        return
    choices = ", ".join(entry for entry in LATENT_SPACES if allow_pixels or not _is_pixels(entry))
    raise UsageError(f"{flag} {name!r} is neither one of {choices} nor a local diffusers folder")


def canonical_latent_space_name(name: str) -> str:
    """What is recorded for --vae name: a local folder as an absolute path (checkpoints and feature
    folders name it wherever the run starts); a table entry as it is."""
    if name not in LATENT_SPACES and os.path.isdir(name):
        return os.path.abspath(name)
    return name


def latent_space(name: str, flag: str = "--vae", allow_pixels: bool = True) -> LatentSpace:
    """The latent space --vae name names, not loaded yet; UsageError for a name that is neither a table
    entry nor a folder."""
    check_latent_space_name(name, flag, allow_pixels)
    return LATENT_SPACES.get(name, AutoencoderKLSpace)(name)


def load_latent_space(name: str, device: torch.device) -> LatentSpace:
    """latent_space(name), its network loaded on device (UsageError when it cannot load)."""
    return latent_space(name).load(device)


def recorded_latent_space(name: Optional[str]) -> LatentSpace:
    """The latent space a checkpoint or feature folder records, not loaded, for its geometry and
    normalisation: its table entry, else a diffusers folder (which need not exist here); without a
    record, the default (SD-VAE)."""
    name = name if isinstance(name, str) else DEFAULT_LATENT_SPACE  # an old checkpoint's args may lack it
    return LATENT_SPACES.get(name, AutoencoderKLSpace)(name)


def as_latent_space(vae: Any, none: Optional[LatentSpace] = None) -> LatentSpace:
    """What callers hold as `vae`, as a LatentSpace: a LatentSpace itself; None: `none` (pixels unless
    given); a bare diffusers AutoencoderKL (benchmarks, tests): its space."""
    if isinstance(vae, LatentSpace):
        return vae
    if vae is None:
        return none if none is not None else PixelSpace()
    return AutoencoderKLSpace(UNNAMED, network=vae)
