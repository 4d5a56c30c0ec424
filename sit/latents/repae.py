"""REPA-E's end-to-end tuned VAEs (diffusers AutoencoderKL folders on the Hugging Face hub): --vae
e2e-vavae (REPA-E/e2e-vavae-hf: VA-VAE's f16d32 shape), e2e-sdvae (REPA-E/e2e-sdvae-hf: SD-VAE's f8d4)
and e2e-invae (REPA-E/e2e-invae-hf: f16d32). A local copy of such a folder is --vae /path/to/it.

Their raw latents are learned as they are (scale 1): REPA-E normalises them per channel (the folders'
config.json carries latents_mean and latents_std), with statistics that replace this normalisation.
"""
from __future__ import annotations

from sit.latents.autoencoder import AutoencoderKLSpace
from sit.latents.space import Normalisation


class E2EVAE16(AutoencoderKLSpace):
    """A REPA-E E2E-VAE of VA-VAE's shape: 32 channels at 1/16 of the image size."""
    channels = 32
    downsampling = 16
    normalisation = Normalisation(scale=1.0)
    repos = {"e2e-vavae": "REPA-E/e2e-vavae-hf", "e2e-invae": "REPA-E/e2e-invae-hf"}

    @property
    def repo(self) -> str:  # type: ignore[override]
        return self.repos[self.name]


class E2EVAE8(E2EVAE16):
    """REPA-E's E2E-SD-VAE: SD-VAE's shape (4 channels at 1/8), another space than SD-VAE's own."""
    channels = 4
    downsampling = 8
    repos = {"e2e-sdvae": "REPA-E/e2e-sdvae-hf"}
