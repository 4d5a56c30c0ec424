"""--guide-ckpt: the guide model of autoguidance (sit.guidance), loaded from its own checkpoint and checked
against the main model (docs/sampling.md); each mismatch is one line naming the flag."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from models import SiT
from sit.checkpoint import load_model
from sit.config import TRANSPORT_SETTINGS
from sit.errors import UsageError, reported_as
from sit.guidance import AutoGuidedModel
from sit.latents import latent_shape
from sit.sampling.settings import ModelSettings, SamplingConfig
from sit.speed import compile_for_sampling

FLAG = "--guide-ckpt"


def describe_shape(config: Mapping[str, Any]) -> str:
    """"4x32x32 latents" or "3x64x64 pixels" for a SiT config."""
    channels, height, width = latent_shape(config)
    return f"{channels}x{height}x{width} {'pixels' if channels == 3 else 'latents'}"


def check_guide(path: str, guide: SiT, info: Mapping[str, Any], main: SiT, settings: ModelSettings) -> None:
    """UsageError (one line naming --guide-ckpt) unless the guide fits the main model and holds other weights."""
    if guide.num_classes != main.num_classes:
        raise UsageError(f"{FLAG} {path} has {guide.num_classes} classes but the main model {main.num_classes}: the "
                         f"guide must know the same labels")
    if latent_shape(guide.config) != latent_shape(main.config):
        raise UsageError(f"{FLAG} {path} works on {describe_shape(guide.config)} but the main model on "
                         f"{describe_shape(main.config)}: the guide must see the same inputs")
    if info.get("latent_statistics") != settings.latent_statistics:
        raise UsageError(f"{FLAG} {path} learned latents normalised by other statistics than the main model's "
                         f"(--latent-norm and the features it was trained on): guide with a model of the same latents")
    stored = info["transport"] or {}
    held = {key: stored.get(key) or TRANSPORT_SETTINGS[key].default for key in ("path_type", "prediction")}
    wanted = {"path_type": settings.transport.path_type, "prediction": settings.transport.prediction}
    if held != wanted:
        raise UsageError(f"{FLAG} {path} predicts {held['prediction']} on the {held['path_type']} path but the main "
                         f"model {wanted['prediction']} on the {wanted['path_type']} path: guide with a model of the "
                         f"same transport")
    if same_weights(main, guide):
        main_name = f"--ckpt {settings.ckpt}" if settings.ckpt is not None else "the published model"
        raise UsageError(f"{FLAG} {path} holds the very weights the main model ({main_name}) samples with: a model "
                         f"guided by itself samples exactly as unguided at any --cfg-scale; guide with a weaker "
                         f"version of it (smaller, trained for less, or the raw weights of an EMA model)")


def same_weights(main: torch.nn.Module, guide: torch.nn.Module) -> bool:
    """Whether two models hold equal tensors under the same names (names, shapes and dtypes first)."""
    mine, theirs = main.state_dict(), guide.state_dict()
    alike = mine.keys() == theirs.keys() and all(
        value.shape == theirs[name].shape and value.dtype == theirs[name].dtype
        for name, value in mine.items())
    return alike and all(torch.equal(value, theirs[name].to(value.device)) for name, value in mine.items())


def attach_guide(main: SiT, settings: ModelSettings, config: SamplingConfig, device: torch.device) -> AutoGuidedModel:
    """The main model (eval, on device) autoguided by --guide-ckpt's model at --cfg-scale over --cfg-interval."""
    path = config.guidance.guide_ckpt
    try:
        with reported_as(f"{FLAG}: cannot load the guide model"):
            guide, info = load_model(path)
    except UsageError as error:
        raise UsageError(f"{FLAG}: {error}") from None
    check_guide(path, guide, info, main, settings)
    guide = guide.to(device).eval()
    if config.compile:
        guide = compile_for_sampling(guide)
    return AutoGuidedModel(main, guide, config.guidance.scale, config.guidance.interval).eval()
