"""What a checkpoint holds, in one place: train.py's resumable checkpoints (`TrainCheckpoint`), and
building the right SiT for any checkpoint (`load_model`) with the flags resolved against it.

A train checkpoint is a plain dict (nanoGPT style), loadable with `torch.load(weights_only=True)`:

    model, ema, opt        state dicts (the raw model, its EMA, AdamW)
    args                   the run's settings as a plain dict (older checkpoints: an argparse.Namespace)
    model_config           SiT constructor arguments
    train_steps, epoch, epoch_step   where training stands (batches done in the current epoch)
    rng                    every rank's RNG states, in rank order
    scaler                 the fp16 GradScaler's state ({} otherwise)
    experiment_dir, wandb_id
    repa_projector         only with --repa-encoder: the alignment projector's state dict (sampling ignores it)
    phema                  with --phema-stds: the power-function EMAs ({"stds", "emas"}; sit.training.phema)
    healing                with self-healing: skipped batches, rollbacks, recent losses (sit.training.healing)
Published checkpoints and bare state dicts hold only weights; they load for sampling and fine-tuning.
"""
from __future__ import annotations

import argparse
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

import download
import models
from sit.config import Rule, Setting, resolve_settings
from sit.errors import UsageError
from sit.files import atomic_torch_save
from sit.vae import PIXEL_CHANNELS, PIXEL_SPACE, image_size_for

RESUMABLE_KEYS = ("model", "ema", "opt", "args", "model_config", "train_steps")
TRANSPORT_KEYS = ("path_type", "prediction", "loss_weight", "train_eps", "sample_eps")


def settings_of(checkpoint: dict) -> dict:
    """The checkpoint's run settings ("args") as a plain dict: a dict, an older Namespace, or {} when absent."""
    stored = checkpoint.get("args")
    if isinstance(stored, argparse.Namespace):
        return dict(vars(stored))
    return dict(stored) if isinstance(stored, dict) else {}


def is_resumable(checkpoint: dict) -> bool:
    """Whether a checkpoint can be resumed (train.py's format), rather than only fine-tuned or sampled."""
    return all(key in checkpoint for key in RESUMABLE_KEYS)


@dataclass
class TrainCheckpoint:
    """Everything an exact resume needs (see the module docstring for the stored keys)."""
    model: dict
    ema: dict
    opt: dict
    settings: dict
    model_config: dict
    train_steps: int
    epoch: int = 0
    epoch_step: int = 0
    rng: list = field(default_factory=list)
    scaler: dict = field(default_factory=dict)
    experiment_dir: Optional[str] = None
    wandb_id: Optional[str] = None
    repa_projector: Optional[dict] = None
    phema: dict = field(default_factory=dict)  # stored only when not empty, so that runs without it write the same files
    healing: dict = field(default_factory=dict)  # likewise

    @classmethod
    def from_dict(cls, checkpoint: dict) -> "TrainCheckpoint":
        """A loaded train checkpoint (older ones hold their settings as a Namespace)."""
        return cls(model=checkpoint["model"], ema=checkpoint["ema"], opt=checkpoint["opt"],
                   settings=settings_of(checkpoint), model_config=dict(checkpoint["model_config"]),
                   train_steps=checkpoint["train_steps"], epoch=checkpoint.get("epoch", 0),
                   epoch_step=checkpoint.get("epoch_step", 0), rng=checkpoint.get("rng") or [],
                   scaler=checkpoint.get("scaler") or {}, experiment_dir=checkpoint.get("experiment_dir"),
                   wandb_id=checkpoint.get("wandb_id"), repa_projector=checkpoint.get("repa_projector"),
                   phema=checkpoint.get("phema") or {}, healing=checkpoint.get("healing") or {})

    def to_dict(self) -> dict:
        """The stored form: plain containers and tensors only (the optional parts only when present)."""
        stored = {"model": self.model, "ema": self.ema, "opt": self.opt, "args": dict(self.settings),
                  "train_steps": self.train_steps, "epoch": self.epoch, "epoch_step": self.epoch_step,
                  "rng": self.rng, "model_config": dict(self.model_config), "experiment_dir": self.experiment_dir,
                  "scaler": self.scaler, "wandb_id": self.wandb_id}
        if self.repa_projector is not None:
            stored["repa_projector"] = self.repa_projector
        stored.update({key: value for key, value in (("phema", self.phema), ("healing", self.healing)) if value})
        return stored

    def save(self, path: str) -> None:
        """Write to path atomically (a temporary file, then a rename)."""
        atomic_torch_save(self.to_dict(), path)


#################################################################################
#                      Building the model a checkpoint holds                    #
#################################################################################

def model_config_of(checkpoint: dict, source: str) -> dict:
    """SiT constructor arguments: the stored "model_config", else read from the parameter shapes."""
    if isinstance(checkpoint.get("model_config"), dict):
        return dict(checkpoint["model_config"])
    try:
        return models.model_config_from_state_dict(download.state_dict_of(checkpoint))
    except (ValueError, KeyError, AttributeError) as error:
        raise download.CheckpointError(f"{source} does not hold SiT weights ({error})") from None


def model_shape_name(config: dict) -> str:
    """What experiment and sample folders call a SiT of this config (SiT constructor arguments): its
    published name (e.g. SiT-S/2) when the shape is one, else custom-d<depth>-w<width>-p<patch>."""
    return (models.model_name_for_config(config)
            or f"custom-d{config['depth']}-w{config['hidden_size']}-p{config['patch_size']}")


def checkpoint_info(config: dict, settings: dict) -> dict:
    """What a checkpoint says about itself: name, image size, classes, channels, VAE, transport."""
    vae = settings.get("vae")
    pixel_space = vae == PIXEL_SPACE or config["in_channels"] == 3
    # only the settings the args hold: a missing key means "unknown", not None
    transport = {key: settings[key] for key in TRANSPORT_KEYS if key in settings} or None
    return {
        "model_name": models.model_name_for_config(config),
        "image_size": image_size_for(config["input_size"], PIXEL_CHANNELS if pixel_space else config["in_channels"]),
        "num_classes": config["num_classes"],
        "in_channels": config["in_channels"],
        "pixel_space": pixel_space,
        "vae": vae,
        "transport": transport,
    }


def _same_shape(model_name: str, config: dict) -> bool:
    """Whether --model names the depth, width and patch size of this config."""
    depth, hidden_size, patch_size, _ = models.MODEL_SHAPES[model_name]
    return (depth, hidden_size, patch_size) == (config["depth"], config["hidden_size"], config["patch_size"])


def check_request(info: dict, config: dict, model_name: Optional[str], image_size: Optional[int],
                  num_classes: Optional[int]) -> None:
    """Raise CheckpointError when the user's --model/--image-size/--num-classes contradict the checkpoint."""
    if model_name is not None and model_name not in models.SiT_models:
        raise download.CheckpointError(f"unknown --model {model_name!r}; choose one of {', '.join(models.SiT_models)}")
    if image_size is not None and image_size % 8 and not info["pixel_space"]:
        raise download.CheckpointError(f"--image-size must be a multiple of 8 for latent models (the VAE downsamples "
                                       f"by 8), got {image_size}; the checkpoint is a latent model trained at "
                                       f"{info['image_size']}")
    held = (f"{info['model_name'] or 'a custom SiT'} (depth {config['depth']}, width {config['hidden_size']}, "
            f"patch {config['patch_size']})")
    settings = {
        "model": Setting(Rule.LOCKED, conflict="{flag} {given} but the checkpoint holds {held}",
                         same=lambda given, _: _same_shape(given, config)),
        "image_size": Setting(Rule.LOCKED, conflict="{flag} {given} but the checkpoint was trained at {held}"),
        "num_classes": Setting(Rule.LOCKED, conflict="{flag} {given} but the checkpoint has {held} classes"),
    }
    given = {key: value for key, value in (("model", model_name), ("image_size", image_size),
                                           ("num_classes", num_classes)) if value is not None}
    stored = {"model": held, "image_size": info["image_size"], "num_classes": info["num_classes"]}
    try:
        resolve_settings(settings, given, stored)
    except UsageError as error:
        raise download.CheckpointError(str(error)) from None


def check_load_arguments(ckpt: Any, model_name: Any, image_size: Any, num_classes: Any) -> None:
    """TypeError/ValueError naming the first bad argument of load_model."""
    download.check_source("load_model(ckpt)", ckpt, optional=True)
    if model_name is not None and not isinstance(model_name, str):
        raise TypeError(f"load_model(model_name) must be a str such as 'SiT-XL/2', or None, got "
                        f"{type(model_name).__name__} {model_name!r}")
    for name, value in (("image_size", image_size), ("num_classes", num_classes)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"load_model({name}) must be a positive int or None, got {type(value).__name__} {value!r}")
        if value <= 0:
            raise ValueError(f"load_model({name}) must be positive, got {value}")


def check_finite_weights(weights: dict, source: str) -> None:
    """CheckpointError naming the first tensor that holds NaN or infinity (a run that diverged): such a
    model samples black images "successfully". The one check of every weights file sampling loads."""
    for name, tensor in weights.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise download.CheckpointError(f"{source} holds non-finite weights: {name} has {bad} NaN or infinite "
                                           f"values of {tensor.numel()} (its training diverged before it was "
                                           f"saved); use an earlier checkpoint")


def load_model(ckpt: Optional[str | os.PathLike], model_name: Optional[str] = None, image_size: Optional[int] = None,
               num_classes: Optional[int] = None) -> tuple[models.SiT, dict]:
    """The SiT a checkpoint holds, in eval mode with its (EMA) weights, and what it knows about itself.

    ckpt: published name, hub file, URL or path; None means the published checkpoint of model_name
    (SiT-XL/2 by default: 256 or 512; SiT-L/2, SiT-B/2, SiT-S/2: 256) at image_size (256 by default).
    model_name / image_size / num_classes: what the user asked for, or None to take the
    checkpoint's; a contradiction raises CheckpointError naming both. Arguments of the wrong type
    or range are a TypeError/ValueError naming the argument; weights holding NaN or infinity are
    refused (CheckpointError naming the tensor).
    Returns (model on the CPU, info) with info = {"model_name", "image_size", "num_classes",
    "in_channels", "pixel_space", "vae", "transport"}; "vae" and "transport" (path_type, prediction, loss_weight,
    train_eps, sample_eps, those the args hold) come from the checkpoint's args, None without.
    """
    check_load_arguments(ckpt, model_name, image_size, num_classes)
    source = download.published_model(model_name, image_size, num_classes) if ckpt is None else os.fspath(ckpt)
    checkpoint = download.load_checkpoint(source)
    config = model_config_of(checkpoint, source)
    info = checkpoint_info(config, settings_of(checkpoint))
    check_request(info, config, model_name, image_size, num_classes)
    weights = download.state_dict_of(checkpoint)
    check_finite_weights(weights, source)
    model = models.SiT(**config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in lines[1:3])[:300]  # skip "Error(s) in loading state_dict"
        raise download.CheckpointError(f"the weights in {source} do not fit the model they describe: {detail}") from None
    return model.eval(), info
