"""REPA-E's end-to-end tuned VAEs, diffusers folders on the hub (--vae e2e-vavae, e2e-invae, e2e-sdvae):
raw latents, scale 1, until per-channel statistics replace it."""
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
