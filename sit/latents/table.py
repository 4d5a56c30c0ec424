"""The latent spaces --vae names, and the resolvers every user of a latent space goes through. A new space
is a LatentSpace subclass plus its entry in LATENT_SPACES; another --vae value is a diffusers folder, or a
checkpoint file of the space its ending names in LATENT_FILES."""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from sit.errors import UsageError
from sit.latents.autoencoder import UNNAMED, AutoencoderKLSpace
from sit.latents.pixels import PIXEL_SPACE, PixelSpace
from sit.latents.repae import E2EVAE8, E2EVAE16
from sit.latents.space import LatentSpace
from sit.latents.vavae import VAVAE_NAME, WHERE, VAVAESpace

# --vae value -> the space's class (built with that name); the order is the order error messages list them in
LATENT_SPACES: dict[str, type[LatentSpace]] = {
    "ema": AutoencoderKLSpace,   # stabilityai/sd-vae-ft-ema
    "mse": AutoencoderKLSpace,   # stabilityai/sd-vae-ft-mse
    PIXEL_SPACE: PixelSpace,     # "none": pixels
    VAVAE_NAME: VAVAESpace,      # "vavae-f16d32": hustvl/vavae-imagenet256-f16d32-dinov2 (LDM format)
    "e2e-vavae": E2EVAE16,       # REPA-E/e2e-vavae-hf
    "e2e-invae": E2EVAE16,       # REPA-E/e2e-invae-hf
    "e2e-sdvae": E2EVAE8,        # REPA-E/e2e-sdvae-hf
}
# a --vae value that is a file with one of these endings: an LDM-format checkpoint of this space
LATENT_FILES: dict[str, type[LatentSpace]] = {".pt": VAVAESpace, ".ckpt": VAVAESpace}
DEFAULT_LATENT_SPACE = "ema"  # train.py's --vae default, and what a record without a VAE is taken to be


def _space_class(name: str) -> type[LatentSpace]:
    """The class of the space `name` records: its table entry, an LDM checkpoint file's, else a diffusers folder's."""
    if name in LATENT_SPACES:
        return LATENT_SPACES[name]
    return LATENT_FILES.get(os.path.splitext(name)[1], AutoencoderKLSpace)


def _is_pixels(name: str) -> bool:
    return name in LATENT_SPACES and LATENT_SPACES[name].pixel_space


def check_latent_space_name(name: str, flag: str = "--vae", allow_pixels: bool = True) -> None:
    """UsageError naming the choices unless `name` is a table entry (pixels only if allow_pixels), a local
    diffusers folder or an existing checkpoint file."""
    if (name in LATENT_SPACES and (allow_pixels or not _is_pixels(name))) or os.path.isdir(name):
        return
    if name not in LATENT_SPACES and os.path.splitext(name)[1] in LATENT_FILES:
        if os.path.isfile(name):
            return
        raise UsageError(f"{flag} {name}: no such file; {WHERE}")
    choices = ", ".join(entry for entry in LATENT_SPACES if allow_pixels or not _is_pixels(entry))
    raise UsageError(f"{flag} {name!r} is neither one of {choices} nor a local diffusers folder")


def canonical_latent_space_name(name: str) -> str:
    """What is recorded for --vae name: a table entry as it is, a local folder or file as an absolute path."""
    if name not in LATENT_SPACES and (os.path.isdir(name) or os.path.isfile(name)):
        return os.path.abspath(name)
    return name


def latent_space(name: str, flag: str = "--vae", allow_pixels: bool = True) -> LatentSpace:
    """The latent space --vae name names, not loaded yet (check_latent_space_name first)."""
    check_latent_space_name(name, flag, allow_pixels)
    return _space_class(name)(name)


def load_latent_space(name: str, device: torch.device) -> LatentSpace:
    """latent_space(name), its network loaded on device (UsageError when it cannot load)."""
    return latent_space(name).load(device)


def recorded_latent_space(name: Optional[str]) -> LatentSpace:
    """The latent space a checkpoint or feature folder records (SD-VAE without a record), not loaded; a
    recorded folder need not exist here."""
    name = name if isinstance(name, str) else DEFAULT_LATENT_SPACE  # an old checkpoint's args may lack it
    return _space_class(name)(name)


def as_latent_space(vae: Any, none: Optional[LatentSpace] = None) -> LatentSpace:
    """`vae` as a LatentSpace: itself; None: `none` (default pixels); a bare AutoencoderKL: its space."""
    if isinstance(vae, LatentSpace):
        return vae
    if vae is None:
        return none if none is not None else PixelSpace()
    return AutoencoderKLSpace(UNNAMED, network=vae)


def image_size_for(input_size: int, in_channels: int) -> int:
    """The image size of a model with this input size: 3-channel models see pixels, others SD-VAE latents."""
    space: LatentSpace = PixelSpace() if in_channels == PixelSpace.channels else AutoencoderKLSpace("ema")
    return space.image_size(input_size)
