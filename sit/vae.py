"""Between images and what the model sees, by the names modules imported before sit.latents: thin
functions over the LatentSpace interface (sit.latents), kept so that their callers need no change yet.

New code takes a LatentSpace (sit.latents.latent_space / recorded_latent_space / as_latent_space):
these names only know SD-VAE latents and pixels. to_uint8_hwc (images -> uint8 pixels) stays here.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from sit.latents import (PIXEL_SPACE, SD_VAE_CHANNELS, SD_VAE_DOWNSAMPLING, SD_VAE_SCALE, VAE_HUB_FILES, VAE_REPOS,
                         AutoencoderKLSpace, LatentSpace, PixelSpace, as_latent_space, canonical_latent_space_name,
                         check_latent_space_name, latent_space, random_sd_vae)

__all__ = ["LATENT_CHANNELS", "LATENT_SCALE", "PIXEL_CHANNELS", "PIXEL_SPACE", "VAE_DOWNSAMPLING", "VAE_HUB_FILES",
           "VAE_REPOS", "canonical_vae_name", "check_image_size", "check_vae_name", "decode_latents", "encode_mean",
           "image_size_for", "input_size_for", "is_pixel_space", "latent_shape", "load_vae", "random_sd_vae",
           "to_uint8_hwc"]

LATENT_SCALE = SD_VAE_SCALE
VAE_DOWNSAMPLING = SD_VAE_DOWNSAMPLING
LATENT_CHANNELS = SD_VAE_CHANNELS
PIXEL_CHANNELS = PixelSpace.channels


def _space(pixel_space: bool) -> LatentSpace:
    """The geometry these functions know: pixels, or SD-VAE latents."""
    return PixelSpace() if pixel_space else AutoencoderKLSpace("ema")


def is_pixel_space(vae: Optional[str]) -> bool:
    return vae == PIXEL_SPACE


def input_size_for(image_size: int, pixel_space: bool) -> int:
    """The model's input size for an image size: the pixels themselves, or the VAE's latent grid."""
    return _space(pixel_space).input_size(image_size)


def image_size_for(input_size: int, in_channels: int) -> int:
    """The image size of a model with this input size: 3-channel models see pixels, others SD-VAE latents."""
    return _space(in_channels == PIXEL_CHANNELS).image_size(input_size)


def latent_shape(config: dict) -> tuple[int, int, int]:
    """What one sample of a SiT with this config (SiT.config) is: (C, L, L)."""
    return (config["in_channels"], config["input_size"], config["input_size"])


def check_image_size(image_size: int, pixel_space: bool, flag: str = "--image-size") -> None:
    """A latent model needs a multiple of 8 (the VAE downsamples by 8); pixels take any size."""
    _space(pixel_space).check_image_size(image_size, flag)


def check_vae_name(name: str, flag: str = "--vae", allow_pixels: bool = True) -> None:
    """A table entry of sit.latents (ema, mse, none, ...) or a local diffusers folder: else a UsageError."""
    check_latent_space_name(name, flag, allow_pixels)


def canonical_vae_name(name: str) -> str:
    """A local VAE folder as an absolute path (checkpoints and feature folders name it wherever the run starts)."""
    return canonical_latent_space_name(name)


def load_vae(name: str, device: torch.device) -> Any:
    """The loaded latent space of --vae name, as its callers use it: an AutoencoderKL (ema, mse, a local
    folder) as the diffusers module itself, frozen, in eval mode; another table entry as its LatentSpace.

    Raises UsageError with a one-line message saying what to pass instead when it cannot load.
    """
    space = latent_space(name, allow_pixels=False).load(device)
    return space.network if isinstance(space, AutoencoderKLSpace) else space


def decode_latents(vae: Any, latents: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Latents (N, C, L, L) to float32 images (N, 3, H, W) in about [-1, 1]: vae a LatentSpace, an
    AutoencoderKL, or None for pixel models. precision: a --precision choice (bf16/fp16 autocast the decoder)."""
    return as_latent_space(vae).decode(latents, precision)


def encode_mean(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] to model latents (N, C, L, L): the posterior mean.

    The mean (not a sample) makes the likelihood of a data set deterministic. Identity for vae None.
    """
    return as_latent_space(vae).encode(images, sample=False)


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] to uint8 (N, H, W, 3), rounded as the original (127.5 x + 128)."""
    pixels = torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1)  # (N, H, W, 3)
    return pixels.to("cpu", dtype=torch.uint8).numpy()
