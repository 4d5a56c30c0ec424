"""Pixel space (train.py --vae none): the model learns the images themselves, in [-1, 1]."""
from __future__ import annotations

import torch

from sit.latents.space import LatentSpace

PIXEL_SPACE = "none"  # what --vae takes and checkpoints record


class PixelSpace(LatentSpace):
    """The identity: 3 channels, no downsampling, no normalisation; decoding keeps outputs to [-1, 1]."""
    channels = 3
    downsampling = 1
    pixel_space = True

    def __init__(self, name: str = PIXEL_SPACE) -> None:
        super().__init__(name)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def posterior(self, images: torch.Tensor, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
        return images, torch.zeros_like(images)

    def encode(self, images: torch.Tensor, sample: bool = True, precision: str = "fp32") -> torch.Tensor:
        return images  # (N, 3, H, W) in [-1, 1], the batch itself

    def decode(self, latents: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        return latents.clamp(-1, 1)  # the model's output, kept to the images' range
