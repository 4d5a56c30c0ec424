"""The model and VAE a sampling run uses: the checkpoint's SiT (or the published one), its settings resolved
against the request, compiled on request, and the latent space that decodes it."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from models import SiT, has_null_class
from sit.checkpoint import load_model, model_shape_name
from sit.config import SamplerFamily
from sit.errors import UsageError, named_by, reported_as
from sit.latents import LatentSpace, load_latent_space
from sit.latents.statistics import LatentStatistics
from sit.sampling.guide import attach_guide
from sit.sampling.settings import ModelSettings, SamplingConfig, resolve_model_settings
from sit.speed import compile_for_sampling, compile_model, configure_precision


@dataclass
class SamplingModel:
    """A loaded model (eval mode, on its device), its latent space, loaded (None in pixel space), and its settings."""
    model: SiT
    vae: Optional[LatentSpace]
    settings: ModelSettings


def setup_torch(precision: str) -> None:
    """No gradients; the matmul precision flags of a --precision choice (TF32 unless fp32)."""
    configure_precision(precision)
    torch.set_grad_enabled(False)


def load_sampling_model(config: SamplingConfig, device: torch.device, vae_default: str) -> tuple[SiT, ModelSettings]:
    """The SiT of the request's checkpoint (or the published one) on `device` in eval mode (autoguided with
    --guide-ckpt), and its settings (vae_default: the script's VAE); UsageError when it cannot load or fit."""
    request = config.request
    if request.ckpt_choice:
        logging.getLogger("sit").info(request.ckpt_choice)  # which checkpoint a folder given as --ckpt gave
    given = named_by("--ckpt") if request.ckpt is not None else contextlib.nullcontext()  # None: the published one
    with reported_as("cannot load the model"), given:
        model, info = load_model(request.ckpt, model_name=request.model_name, image_size=request.image_size,
                                 num_classes=request.num_classes)
    check_model_kind(model.config, config.sampler)
    settings = resolve_model_settings(config, info, has_null_class=has_null_class(model.config),
                                      vae_default=vae_default, shape_name=model_shape_name(model.config))
    model = model.to(device).eval()
    if config.compile:  # the likelihood differentiates through the model: it keeps training's per-block compile
        model = compile_model(model) if config.likelihood is not None else compile_for_sampling(model)
    if config.guidance.guide_ckpt is not None:  # autoguidance: the model the samplers call guides itself
        model = attach_guide(model, settings, config, device)
    return model, settings


def check_model_kind(model_config: dict, sampler: SamplerFamily) -> None:
    """UsageError when the sampler does not fit what the model outputs: a MeanFlow model (average velocity)
    outside mode MeanFlow, or a velocity model in it."""
    mean_flow = bool(model_config.get("mean_flow", False))
    if mean_flow and not sampler.average_velocity:
        raise UsageError(f"--ckpt is a MeanFlow model (trained with --objective meanflow, it outputs average "
                         f"velocities): sample it with mode MeanFlow --num-sampling-steps 1 or 2, not {sampler.mode}")
    if sampler.average_velocity and not mean_flow:
        raise UsageError(f"--sampling-method {sampler.sampling_method} samples models trained with --objective "
                         f"meanflow; --ckpt is a velocity model: use mode ODE or SDE")


def load_decoder(vae: Optional[str], device: torch.device,
                 statistics: Optional[LatentStatistics] = None) -> Optional[LatentSpace]:
    """The latent space --vae vae names, loaded on device (UsageError when it cannot load), or None for
    pixel-space models (as sit.training's: sit.latents.as_latent_space reads None as pixels); with a
    per-channel checkpoint's statistics it (de-)normalises by them."""
    if vae is None:
        return None
    space = load_latent_space(vae, device)
    return space if statistics is None else space.use_normalisation(statistics.normalisation())


def load_for_sampling(config: SamplingConfig, device: torch.device, vae_default: str) -> SamplingModel:
    """The model, its settings and its VAE (see load_sampling_model)."""
    model, settings = load_sampling_model(config, device, vae_default)
    with reported_as("cannot load the model"):
        return SamplingModel(model, load_decoder(settings.vae, device, settings.latent_statistics), settings)
