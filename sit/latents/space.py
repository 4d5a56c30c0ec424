"""What every latent space answers: the mapping between images and what a SiT learns."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Union

import torch

from sit.errors import UsageError

Factor = Union[float, tuple[float, ...]]  # one constant, or one value per channel


def _broadcast(factor: Factor, like: torch.Tensor) -> Union[float, torch.Tensor]:
    """A constant as it is (Python float arithmetic, as the original); per-channel values as (1, C, 1, 1)."""
    if isinstance(factor, (int, float)):
        return factor
    return torch.tensor(factor, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)  # over (N, C, H, W)


def _is_zero(factor: Factor) -> bool:
    return all(value == 0 for value in factor) if isinstance(factor, tuple) else factor == 0


@dataclass(frozen=True)
class Normalisation:
    """latents = (raw - shift) * scale, raw = latents / scale + shift; constants or one value per channel.
    A zero shift is skipped, so SD-VAE's latents are exactly raw * scale, as the original computes them."""
    scale: Factor = 1.0
    shift: Factor = 0.0

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        if not _is_zero(self.shift):
            raw = raw - _broadcast(self.shift, raw)
        return raw * _broadcast(self.scale, raw)

    def invert(self, latents: torch.Tensor) -> torch.Tensor:
        raw = latents / _broadcast(self.scale, latents)
        if not _is_zero(self.shift):
            raw = raw + _broadcast(self.shift, raw)
        return raw


class LatentSpace(ABC):
    """Images (N, 3, H, W) in [-1, 1] <-> model latents (N, channels, H / downsampling, W / downsampling).
    name: what --vae took and records keep. A network loads once: by `load(device)` or at the first
    encode/decode. Subclasses set channels, downsampling, normalisation and implement posterior, decode."""
    channels: int
    downsampling: int
    normalisation: Normalisation = Normalisation()
    pixel_space: bool = False  # the model learns the images themselves (train.py --vae none)
    measured: Optional[Normalisation] = None  # replaces `normalisation`: per-channel statistics (use_normalisation)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def load(self, device: torch.device) -> "LatentSpace":
        """Ready to encode and decode on device (a space without a network is always ready); returns self."""
        return self

    def use_normalisation(self, normalisation: Normalisation) -> "LatentSpace":
        """Normalise with this instead of the space's own (--latent-norm per-channel); returns self."""
        self.measured = normalisation
        return self

    @property
    def active_normalisation(self) -> Normalisation:
        return self.measured if self.measured is not None else self.normalisation

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents (N, C, L, L) -> what the model learns."""
        return self.active_normalisation.apply(raw)

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """What the model learns (N, C, L, L) -> raw latents for the decoder."""
        return self.active_normalisation.invert(latents)

    @abstractmethod
    def posterior(self, images: torch.Tensor, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, H, W) -> the raw posterior (mean, std), (N, C, L, L) each: what feature folders cache."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Model latents (N, C, L, L) -> float32 images (N, 3, H, W) in about [-1, 1], under --precision."""

    def encode(self, images: torch.Tensor, sample: bool = True, precision: str = "fp32") -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> model latents (N, C, L, L): a posterior draw, or its mean."""
        mean, std = self.posterior(images, precision)
        return self.sample_posterior(mean, std) if sample else self.normalise(mean)

    def sample_posterior(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """normalise(mean + std * noise) of a raw posterior (N, C, L, L), the noise as diffusers draws it."""
        noise = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        return self.normalise(mean + std * noise)

    def input_size(self, image_size: int) -> int:
        """The model's input size (latent grid side) for images of this size."""
        return image_size // self.downsampling

    def image_size(self, input_size: int) -> int:
        """The image size a model of this input size generates."""
        return input_size * self.downsampling

    def check_image_size(self, image_size: int, flag: str = "--image-size") -> None:
        """UsageError unless the downsampling divides image_size."""
        if image_size % self.downsampling:
            raise UsageError(f"{flag} must be a multiple of {self.downsampling} (the VAE downsamples by "
                             f"{self.downsampling}), got {image_size}")



def latent_shape(config: dict) -> tuple[int, int, int]:
    """What one sample of a SiT with this config (SiT.config) is: (C, L, L)."""
    return (config["in_channels"], config["input_size"], config["input_size"])


def uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] to uint8 (N, H, W, 3) on their device, rounded as the original."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)  # (N, H, W, 3)
