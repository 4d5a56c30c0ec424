"""Names imported before sit.latents: a sample's shape, uint8 images, and thin functions that only know
SD-VAE latents and pixels (new code takes a sit.latents.LatentSpace)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from sit.latents import PIXEL_SPACE, AutoencoderKLSpace, LatentSpace, PixelSpace, random_sd_vae

__all__ = ["image_size_for", "is_pixel_space", "latent_shape", "random_sd_vae", "to_uint8_hwc"]


def is_pixel_space(vae: Optional[str]) -> bool:
    return vae == PIXEL_SPACE


def image_size_for(input_size: int, in_channels: int) -> int:
    """The image size of a model with this input size: 3-channel models see pixels, others SD-VAE latents."""
    space: LatentSpace = PixelSpace() if in_channels == PixelSpace.channels else AutoencoderKLSpace("ema")
    return space.image_size(input_size)


def latent_shape(config: dict) -> tuple[int, int, int]:
    """What one sample of a SiT with this config (SiT.config) is: (C, L, L)."""
    return (config["in_channels"], config["input_size"], config["input_size"])


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] to uint8 (N, H, W, 3), rounded as the original (127.5 x + 128)."""
    pixels = torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1)  # (N, H, W, 3)
    return pixels.to("cpu", dtype=torch.uint8).numpy()
