"""Between images and what the model sees: the SD VAE's latents, or the pixels themselves (`--vae none`).

One place for the pixel-space marker, the latent scale and shape, and the conversions
images <-> model inputs <-> uint8 pixels.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import numpy as np
import torch

from sit.errors import UsageError, error_line
from sit.hub import HubUnavailable, hub_folder
from sit.speed import autocast

LATENT_SCALE = 0.18215  # SD-VAE latents are scaled by this to unit variance
VAE_REPOS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
VAE_HUB_FILES = ("config.json", "diffusion_pytorch_model.safetensors")  # what loading a hub VAE downloads
PIXEL_SPACE = "none"  # --vae none: no VAE, the model learns pixels in [-1, 1]
VAE_DOWNSAMPLING = 8  # SD-VAE: an image of size H gives latents of size H / 8
LATENT_CHANNELS = 4
PIXEL_CHANNELS = 3


def is_pixel_space(vae: Optional[str]) -> bool:
    return vae == PIXEL_SPACE


def input_size_for(image_size: int, pixel_space: bool) -> int:
    """The model's input size for an image size: the pixels themselves, or the VAE's latent grid."""
    return image_size if pixel_space else image_size // VAE_DOWNSAMPLING


def image_size_for(input_size: int, in_channels: int) -> int:
    """The image size of a model with this input size: 3-channel models see pixels, others SD-VAE latents."""
    return input_size if in_channels == PIXEL_CHANNELS else input_size * VAE_DOWNSAMPLING


def latent_shape(config: dict) -> tuple[int, int, int]:
    """What one sample of a SiT with this config (SiT.config) is: (C, L, L)."""
    return (config["in_channels"], config["input_size"], config["input_size"])


def check_image_size(image_size: int, pixel_space: bool, flag: str = "--image-size") -> None:
    """A latent model needs a multiple of 8 (the VAE downsamples by 8); pixels take any size."""
    if not pixel_space and image_size % VAE_DOWNSAMPLING:
        raise UsageError(f"{flag} must be a multiple of 8 (the VAE downsamples by 8), got {image_size}")


def check_vae_name(name: str, flag: str = "--vae", allow_pixels: bool = True) -> None:
    """ema, mse, a local diffusers folder (or none for pixels): else a UsageError naming the choices."""
    if name in VAE_REPOS or os.path.isdir(name) or (allow_pixels and is_pixel_space(name)):
        return
    choices = ", ".join(list(VAE_REPOS) + ([PIXEL_SPACE] if allow_pixels else []))
    raise UsageError(f"{flag} {name!r} is neither one of {choices} nor a local diffusers folder")


def canonical_vae_name(name: str) -> str:
    """A local VAE folder as an absolute path (checkpoints and feature folders name it wherever the run starts)."""
    if name not in VAE_REPOS and not is_pixel_space(name) and os.path.isdir(name):
        return os.path.abspath(name)
    return name


def load_vae(name: str, device: torch.device) -> Any:
    """The SD VAE: "ema" or "mse" (from the Hugging Face hub) or a local diffusers folder, frozen, in eval mode.

    Raises UsageError with a one-line message saying what to pass instead when it cannot load.
    """
    from diffusers.models import AutoencoderKL

    check_vae_name(name, allow_pixels=False)
    source = VAE_REPOS.get(name, name)
    advice = "download it once with network access, or pass --vae /path/to/a/local/diffusers/AutoencoderKL/folder"
    try:
        # the hub's VAE: its two files from the cache, or fetched with a bounded failure (sit.hub)
        folder = hub_folder(source, VAE_HUB_FILES) if name in VAE_REPOS else source
        vae = AutoencoderKL.from_pretrained(folder)
    except HubUnavailable as error:
        raise UsageError(f"could not load the VAE {source!r}: {error}; {advice}") from None
    except Exception as error:  # file errors: all end the same way for the user
        raise UsageError(f"could not load the VAE {source!r} ({error_line(error)}); {advice}") from None
    return vae.to(device).eval().requires_grad_(False)


def random_sd_vae(widths: tuple[int, ...] = (128, 256, 512, 512), layers_per_block: int = 2, norm_groups: int = 32) -> Any:
    """A randomly initialised AutoencoderKL: by default Stable Diffusion's VAE architecture (downsampling
    by 8 to 4 channels), for benchmarks and device checks without a download; narrower widths give a
    tiny one with the same downsampling. On the CPU, in eval mode."""
    from diffusers.models import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
                         up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                         layers_per_block=layers_per_block, latent_channels=LATENT_CHANNELS, norm_num_groups=norm_groups,
                         sample_size=256).eval()


def decode_latents(vae: Any, latents: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Latents (N, 4, L, L) to float32 images (N, 3, 8L, 8L) in about [-1, 1]; identity for pixel
    models (vae None). precision: a --precision choice (bf16/fp16 autocast the decoder)."""
    if vae is None:
        return latents.clamp(-1, 1)  # pixels: the model's output, kept to the images' range
    with autocast(precision, latents.device):
        return vae.decode(latents / LATENT_SCALE).sample.float()


def encode_mean(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] to scaled latents (N, 4, H/8, W/8): the posterior mean.

    The mean (not a sample) makes the likelihood of a data set deterministic. Identity for vae None.
    """
    if vae is None:
        return images
    return vae.encode(images).latent_dist.mean * LATENT_SCALE


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] to uint8 (N, H, W, 3), rounded as the original (127.5 x + 128)."""
    pixels = torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1)  # (N, H, W, 3)
    return pixels.to("cpu", dtype=torch.uint8).numpy()
