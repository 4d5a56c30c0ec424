"""Preview grids while training: the EMA model's samples of fixed noise and labels, as one PNG, and
those labels as the grid shows them (`<experiment>/preview_labels.txt`: the same for every grid, as
the noise and labels are fixed by --global-seed)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from models import has_null_class
from sit.config import GuidanceConfig
from sit.generation import guided_sample
from sit.grid import GridLayout, save_grid, save_labels
from sit.latents import LatentSpace, as_latent_space, latent_shape
from sit.sampling.families import training_sample_fn
from transport import Transport

PREVIEW_IMAGES = 16  # EMA samples per preview grid (4 x 4)
PREVIEW_STEPS = 50   # fixed-step Euler ODE: bounded time and memory (the original ran dopri5, issue #11)
PREVIEW_LABELS = "preview_labels.txt"  # <experiment>/preview_labels.txt: the labels of every grid in samples/


def preview_inputs(global_seed: int, model_config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed noise (N, C, L, L) and labels (N,) for the preview grids, from their own generator."""
    generator = torch.Generator().manual_seed(global_seed)
    z = torch.randn(PREVIEW_IMAGES, *latent_shape(model_config), generator=generator)
    y = torch.randint(0, model_config["num_classes"], (PREVIEW_IMAGES,), generator=generator)
    return z, y


@torch.no_grad()
def save_preview(ema: torch.nn.Module, vae: Optional[LatentSpace], transport: Transport,
                 inputs: tuple[torch.Tensor, torch.Tensor], cfg_scale: float, path: str, device: torch.device,
                 labels_file: Optional[str] = None) -> None:
    """Sample the EMA with a fixed-step Euler ODE (MeanFlow: 2 jumps), decode (vae None: pixels), and save the
    grid PNG at path and its labels at labels_file, atomically; cfg_scale guides models with a null class."""
    z, y = (tensor.to(device) for tensor in inputs)
    sample_fn = training_sample_fn(ema.config, transport, PREVIEW_STEPS, jumps=2)  # a MeanFlow run: 2 jumps
    use_cfg = cfg_scale > 1.0 and has_null_class(ema.config)
    latents = guided_sample(sample_fn, ema, z, y, GuidanceConfig(scale=cfg_scale if use_cfg else 1.0))
    images = as_latent_space(vae).decode(latents)                          # (N, 3, H, W) in about [-1, 1]
    layout = GridLayout.with_columns(len(images), int(math.sqrt(len(images))))
    save_grid(images.float().cpu(), layout, path, fmt="png")
    if labels_file is not None:
        save_labels(y.tolist(), layout, labels_file)
