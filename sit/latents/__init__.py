"""The image <-> latent mapping behind `LatentSpace`, and the --vae table (docs/latent_spaces.md)."""
# re-exported: the names the package offers
from sit.latents.autoencoder import SD_VAE_SCALE, VAE_HUB_FILES, AutoencoderKLSpace, random_sd_vae
from sit.latents.pixels import PIXEL_SPACE, PixelSpace
from sit.latents.space import LatentSpace, Normalisation, latent_shape, uint8_hwc
from sit.latents.table import (LATENT_SPACES, as_latent_space, canonical_latent_space_name, check_latent_space_name,
                               image_size_for, latent_space, load_latent_space, recorded_latent_space)
