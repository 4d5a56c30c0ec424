"""Stable Diffusion's VAE, or any diffusers AutoencoderKL: --vae ema, mse (from the Hugging Face hub)
or a local diffusers folder. Downsampling 8, latents scaled by 0.18215 to about unit variance."""
from __future__ import annotations

from typing import Any, Optional

import torch

from sit.errors import UsageError, error_line
from sit.hub import HubUnavailable, hub_folder
from sit.latents.space import LatentSpace, Normalisation
from sit.speed import autocast

SD_VAE_SCALE = 0.18215  # SD-VAE latents are scaled by this to unit variance
SD_VAE_CHANNELS = 4
SD_VAE_DOWNSAMPLING = 8  # an image of size H gives latents of size H / 8
VAE_REPOS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
VAE_HUB_FILES = ("config.json", "diffusion_pytorch_model.safetensors")  # what loading a hub VAE downloads
UNNAMED = "<an AutoencoderKL>"  # the name of a space around a network given as it is (benchmarks, tests)


def load_autoencoder(name: str, device: torch.device) -> Any:
    """The AutoencoderKL of "ema" or "mse" (from the hub) or of a local diffusers folder, frozen, in eval
    mode on device. Raises UsageError with a one-line message saying what to pass instead."""
    from diffusers.models import AutoencoderKL

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
                         layers_per_block=layers_per_block, latent_channels=SD_VAE_CHANNELS, norm_num_groups=norm_groups,
                         sample_size=256).eval()


class AutoencoderKLSpace(LatentSpace):
    """A diffusers AutoencoderKL's latents x 0.18215. name: "ema", "mse" or a folder's absolute path;
    network: an AutoencoderKL already loaded (else loaded by `load` or at the first encode/decode)."""
    downsampling = SD_VAE_DOWNSAMPLING
    normalisation = Normalisation(scale=SD_VAE_SCALE)

    def __init__(self, name: str, network: Optional[Any] = None) -> None:
        super().__init__(name)
        self.network = network

    @property
    def channels(self) -> int:
        """The loaded network's latent channels (a local folder may hold another VAE), else SD-VAE's 4."""
        return self.network.config.latent_channels if self.network is not None else SD_VAE_CHANNELS

    def load(self, device: torch.device) -> "AutoencoderKLSpace":
        if self.network is None:
            self.network = load_autoencoder(self.name, device)
        return self

    def _network(self, device: torch.device) -> Any:
        return self.load(device).network

    def posterior(self, images: torch.Tensor, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(precision, images.device):
            posterior = self._network(images.device).encode(images).latent_dist
        return posterior.mean, posterior.std  # (N, 4, H/8, W/8) each

    def encode(self, images: torch.Tensor, sample: bool = True, precision: str = "fp32") -> torch.Tensor:
        with autocast(precision, images.device):
            posterior = self._network(images.device).encode(images).latent_dist
        raw = posterior.sample() if sample else posterior.mean  # sample(): mean + std * torch.randn
        return self.normalise(raw.float())                        # (N, 4, H/8, W/8)

    def decode(self, latents: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        with autocast(precision, latents.device):
            return self._network(latents.device).decode(self.denormalise(latents)).sample.float()  # (N, 3, 8L, 8L)
