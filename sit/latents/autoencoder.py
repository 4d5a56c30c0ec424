"""Stable Diffusion's VAE (--vae ema, mse) or any diffusers AutoencoderKL folder, whose config.json gives
its geometry and normalisation."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

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
LOCAL_ADVICE = "pass --vae /path/to/a/local/diffusers/AutoencoderKL/folder"


def folder_config(folder: str) -> Optional[dict]:
    """A local diffusers folder's config.json, or None; UsageError when it cannot be read."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as file:
            config = json.load(file)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read the VAE config {path} ({error_line(error)}); {LOCAL_ADVICE}") from None
    return config


def autoencoder_geometry(config: Mapping[str, Any]) -> tuple[int, int, Normalisation]:
    """(channels, downsampling, normalisation) of an AutoencoderKL config, with diffusers' defaults."""
    channels = int(config.get("latent_channels", 4))
    downsampling = 2 ** (len(config.get("block_out_channels", (64,))) - 1)  # every level but the last halves
    scale = float(config.get("scaling_factor", SD_VAE_SCALE))
    shift = float(config.get("shift_factor") or 0.0)
    return channels, downsampling, Normalisation(scale=scale, shift=shift)


def random_sd_vae(widths: tuple[int, ...] = (128, 256, 512, 512), layers_per_block: int = 2, norm_groups: int = 32) -> Any:
    """A randomly initialised AutoencoderKL (default: SD-VAE's architecture) on the CPU, in eval mode."""
    from diffusers.models import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
                         up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                         layers_per_block=layers_per_block, latent_channels=SD_VAE_CHANNELS, norm_num_groups=norm_groups,
                         sample_size=256).eval()


class AutoencoderKLSpace(LatentSpace):
    """A diffusers AutoencoderKL's latents. name: "ema", "mse" or a folder's absolute path (its config's
    geometry; SD-VAE's when not here); network: one already loaded. Hub subclasses set `repo` and geometry."""
    channels = SD_VAE_CHANNELS
    downsampling = SD_VAE_DOWNSAMPLING
    normalisation = Normalisation(scale=SD_VAE_SCALE)
    repo: Optional[str] = None  # a hub repository holding the diffusers folder (else VAE_REPOS[name] or a folder)

    def __init__(self, name: str, network: Optional[Any] = None) -> None:
        super().__init__(name)
        self.network = network
        # a network's own config (a wrapper without one: SD-VAE's geometry), else a folder's config.json
        config = getattr(network, "config", None) if network is not None else folder_config(name)
        if config is not None:  # instance attributes: statistics may still replace the normalisation
            self.channels, self.downsampling, self.normalisation = autoencoder_geometry(config)

    def load(self, device: torch.device) -> "AutoencoderKLSpace":
        if self.network is None:
            network = self.load_network(device)
            channels, downsampling, _ = autoencoder_geometry(network.config)
            if (channels, downsampling) != (self.channels, self.downsampling):
                raise UsageError(f"the VAE {self.name} has {channels}-channel latents at 1/{downsampling} of the "
                                 f"image size, not the {self.channels} at 1/{self.downsampling} it was recorded with; "
                                 f"pass --vae with the autoencoder the model was trained with")
            self.network = network
        return self

    def load_network(self, device: torch.device) -> Any:
        """The AutoencoderKL of `repo`, "ema", "mse" or a local folder on device; UsageError saying what to pass."""
        from diffusers.models import AutoencoderKL

        repo = self.repo or VAE_REPOS.get(self.name)
        source = repo or self.name
        advice = f"download it once with network access, or {LOCAL_ADVICE}"
        try:
            # the hub's VAE: its two files from the cache, or fetched with a bounded failure (sit.hub)
            folder = hub_folder(repo, VAE_HUB_FILES) if repo else source
            vae = AutoencoderKL.from_pretrained(folder)
        except HubUnavailable as error:
            raise UsageError(f"could not load the VAE {source!r}: {error}; {advice}") from None
        except Exception as error:  # file errors: all end the same way for the user
            raise UsageError(f"could not load the VAE {source!r} ({error_line(error)}); {advice}") from None
        return vae.to(device).eval().requires_grad_(False)

    def _posterior(self, images: torch.Tensor, precision: str) -> Any:
        with autocast(precision, images.device):
            return self.load(images.device).network.encode(images).latent_dist

    def posterior(self, images: torch.Tensor, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self._posterior(images, precision)
        return posterior.mean, posterior.std  # (N, C, H/d, W/d) each

    def encode(self, images: torch.Tensor, sample: bool = True, precision: str = "fp32") -> torch.Tensor:
        posterior = self._posterior(images, precision)
        raw = posterior.sample() if sample else posterior.mean  # sample(): mean + std * torch.randn
        return self.normalise(raw.float())                        # (N, C, H/d, W/d)

    def decode(self, latents: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        with autocast(precision, latents.device):
            network = self.load(latents.device).network
            return network.decode(self.denormalise(latents)).sample.float()  # (N, 3, dL, dL)
