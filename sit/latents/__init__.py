"""The image <-> latent mapping behind one interface (`LatentSpace`): SD-VAE / diffusers AutoencoderKL
latents (`autoencoder`), VA-VAE's LDM checkpoint (`vavae`), REPA-E's E2E-VAEs (`repae`), pixels
(`pixels`), and the table --vae names them by (`table`)."""
from sit.latents.autoencoder import (SD_VAE_CHANNELS, SD_VAE_DOWNSAMPLING, SD_VAE_SCALE, VAE_HUB_FILES, VAE_REPOS,
                                     AutoencoderKLSpace, load_autoencoder, random_sd_vae)
from sit.latents.pixels import PIXEL_SPACE, PixelSpace
from sit.latents.space import LatentSpace, Normalisation
from sit.latents.table import (DEFAULT_LATENT_SPACE, LATENT_SPACES, as_latent_space, canonical_latent_space_name,
                               check_latent_space_name, latent_space, load_latent_space, recorded_latent_space)

__all__ = ["AutoencoderKLSpace", "DEFAULT_LATENT_SPACE", "LATENT_SPACES", "LatentSpace", "Normalisation", "PIXEL_SPACE",
           "PixelSpace", "SD_VAE_CHANNELS", "SD_VAE_DOWNSAMPLING", "SD_VAE_SCALE", "VAE_HUB_FILES", "VAE_REPOS",
           "as_latent_space", "canonical_latent_space_name", "check_latent_space_name", "latent_space",
           "load_autoencoder", "load_latent_space", "random_sd_vae", "recorded_latent_space"]
