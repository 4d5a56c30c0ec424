"""What a checkpoint holds, in one place: train.py's resumable checkpoints (`TrainCheckpoint`, a plain dict on
disk whose keys docs/training.md lists), and building the right SiT for any checkpoint (`load_model`). What a
checkpoint says is judged before use, one line naming the file: a model config before any allocation
(`model_config_problem`), a train checkpoint before a resume (`check_train_checkpoint`), weights for sampling
(`non_finite_tensor`)."""
from __future__ import annotations

import argparse
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

import download
import models
from sit.archives import available_memory
from sit.errors import UsageError
from sit.files import atomic_torch_save, check_free_space, format_bytes
from sit.latents import PixelSpace, recorded_latent_space
from sit.latents.statistics import CONSTANT, PER_CHANNEL, LatentStatistics

RESUMABLE_KEYS = ("model", "ema", "opt", "args", "model_config", "train_steps")
CORE_KEYS = RESUMABLE_KEYS + ("epoch", "epoch_step", "rng", "scaler", "experiment_dir", "wandb_id", "extras",
                               "latent_statistics")
# older checkpoints' key of a loss term's state -> (the term's name, the prefix of its state dict's keys)
LEGACY_EXTRAS = {"repa_projector": ("repa", "projector.")}
TRANSPORT_KEYS = ("path_type", "prediction", "loss_weight", "train_eps", "sample_eps")


def settings_of(checkpoint: dict) -> dict:
    """The checkpoint's run settings ("args") as a plain dict: a dict, an older Namespace, or {} when absent."""
    stored = checkpoint.get("args")
    if isinstance(stored, argparse.Namespace):
        return dict(vars(stored))
    return dict(stored) if isinstance(stored, dict) else {}


@dataclass
class TrainCheckpoint:
    """Everything an exact resume needs (the stored keys: docs/training.md, "Stopping and resuming")."""
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
    extras: dict = field(default_factory=dict)  # loss terms' state dicts by name (stored only when not empty)
    extensions: dict = field(default_factory=dict)  # loop extensions' states by name (each stored only when not empty)
    latent_statistics: Optional[dict] = None  # --latent-norm per-channel's statistics (stored only then)

    @classmethod
    def from_dict(cls, checkpoint: dict) -> "TrainCheckpoint":
        """A loaded train checkpoint (older ones hold their settings as a Namespace)."""
        return cls(model=checkpoint["model"], ema=checkpoint["ema"], opt=checkpoint["opt"],
                   settings=settings_of(checkpoint), model_config=dict(checkpoint["model_config"]),
                   train_steps=checkpoint["train_steps"], epoch=checkpoint.get("epoch", 0),
                   epoch_step=checkpoint.get("epoch_step", 0), rng=checkpoint.get("rng") or [],
                   scaler=checkpoint.get("scaler") or {}, experiment_dir=checkpoint.get("experiment_dir"),
                   wandb_id=checkpoint.get("wandb_id"), extras=extras_of(checkpoint),
                   extensions={key: value for key, value in checkpoint.items()
                               if key not in CORE_KEYS and key not in LEGACY_EXTRAS and isinstance(value, dict)},
                   latent_statistics=checkpoint.get("latent_statistics"))

    def to_dict(self) -> dict:
        """The stored form: plain containers and tensors only (the optional parts only when present)."""
        stored = {"model": self.model, "ema": self.ema, "opt": self.opt, "args": dict(self.settings),
                  "train_steps": self.train_steps, "epoch": self.epoch, "epoch_step": self.epoch_step,
                  "rng": self.rng, "model_config": dict(self.model_config), "experiment_dir": self.experiment_dir,
                  "scaler": self.scaler, "wandb_id": self.wandb_id}
        if self.extras:
            stored["extras"] = self.extras
        if self.latent_statistics is not None:
            stored["latent_statistics"] = self.latent_statistics
        stored.update({key: value for key, value in self.extensions.items() if value})
        return stored

    def save(self, path: str) -> None:
        """Write to path atomically once its tensors are known to fit the space there (else NoSpaceLeft)."""
        stored = self.to_dict()
        check_free_space(path, tensor_bytes(stored) + (1 << 20), f"the checkpoint {os.path.basename(path)}")
        atomic_torch_save(stored, path)


def extras_of(checkpoint: dict) -> dict:
    """The loss terms' state dicts by term name (older checkpoints: their own keys, see LEGACY_EXTRAS)."""
    extras = dict(checkpoint.get("extras") or {})
    for key, (name, prefix) in LEGACY_EXTRAS.items():
        if isinstance(checkpoint.get(key), dict):
            extras.setdefault(name, {prefix + param: value for param, value in checkpoint[key].items()})
    return extras


def tensor_bytes(value: Any) -> int:
    """The bytes of every tensor in nested dicts and lists (what torch.save writes, less its small headers)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return sum(tensor_bytes(item) for item in items)


# Judging what a checkpoint says, before using it

FLOAT32_BYTES = 4


def model_config_problem(config: Any) -> Optional[str]:
    """What is wrong with SiT constructor arguments (None: a sane model whose float32 weights fit memory)."""
    problem = models.ModelConfig.problem_of(config)
    if problem is not None:
        return problem
    count = models.ModelConfig.from_dict(config).parameter_count()
    memory = available_memory()
    if count * FLOAT32_BYTES > memory:
        return (f"the model config describes {count:,} parameters ({format_bytes(count * FLOAT32_BYTES)} in float32), "
                f"more than the {format_bytes(memory)} of memory available")
    return None


def non_finite_tensor(state_dict: dict) -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or Inf, with what it holds; None when all are finite."""
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            kinds = [kind for kind, present in (("NaN", torch.isnan(tensor).any()), ("Inf", torch.isinf(tensor).any()))
                     if present]
            return f"{name} ({' and '.join(kinds)})"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def optimizer_problem(opt: Any, parameter_shapes: list[torch.Size]) -> Optional[str]:
    """What is wrong with a stored AdamW state for parameters of these shapes (in model order), or None."""
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        return "its optimizer state is not {'state': {...}, 'param_groups': [...]}"
    indices = []
    for group in opt["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) \
                or not all(_is_count(index) for index in group["params"]):
            return "its optimizer state has a parameter group without a list of parameter indices"
        indices += group["params"]
    if sorted(indices) != list(range(len(parameter_shapes))):
        return (f"its optimizer state covers parameter indices {len(indices)} in all, the model has "
                f"{len(parameter_shapes)} parameters")
    for index, state in opt["state"].items():
        if not _is_count(index) or index >= len(parameter_shapes) or not isinstance(state, dict):
            return f"its optimizer state has an entry {index!r} that is no parameter's"
        for key in ("exp_avg", "exp_avg_sq"):
            moment = state.get(key)
            if not isinstance(moment, torch.Tensor) or moment.shape != parameter_shapes[index]:
                shape = tuple(moment.shape) if isinstance(moment, torch.Tensor) else type(moment).__name__
                return (f"its optimizer state's {key} of parameter {index} is {shape}, the parameter "
                        f"{tuple(parameter_shapes[index])}")
        step = state.get("step")
        if not isinstance(step, (int, float, torch.Tensor)) or (isinstance(step, torch.Tensor) and step.numel() != 1):
            return f"its optimizer state's step of parameter {index} is not a number"
    return None


def rng_problem(rng: Any) -> Optional[str]:
    """What is wrong with a checkpoint's per-rank RNG states ([{"cpu": ByteTensor, "cuda": ...}]), or None."""
    if not isinstance(rng, list):
        return "its RNG states are not a list (one per rank)"
    cpu_size = torch.get_rng_state().numel()
    for rank, state in enumerate(rng):
        if not isinstance(state, dict):
            return f"its RNG state of rank {rank} is not a dict"
        cpu, cuda = state.get("cpu"), state.get("cuda")
        if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8 or cpu.shape != (cpu_size,):
            return f"its CPU RNG state of rank {rank} is not {cpu_size} bytes"
        if cuda is not None and (not isinstance(cuda, torch.Tensor) or cuda.dtype != torch.uint8 or cuda.dim() != 1):
            return f"its CUDA RNG state of rank {rank} is not a byte tensor"
    return None


def train_checkpoint_problem(checkpoint: dict) -> Optional[str]:
    """What is wrong with a resumable checkpoint's contents (see check_train_checkpoint), or None."""
    problem = model_config_problem(checkpoint["model_config"])  # the model is built on the CPU first
    if problem is not None:
        return problem
    for key in ("train_steps", "epoch", "epoch_step"):
        if key in checkpoint and not _is_count(checkpoint[key]):
            return f"its {key} is {checkpoint[key]!r}, not a count >= 0"
    extras = extras_of(checkpoint)  # AdamW holds the SiT's parameters, then each loss term's
    named = [("model", checkpoint["model"]), ("ema", checkpoint["ema"])]
    for what, weights in named + [(f"{name} term's state", weights) for name, weights in extras.items()]:
        if not isinstance(weights, dict) or not all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                                    for key, value in weights.items()):
            return f"its {what} is not a dict of named tensors"
    shapes = [tensor.shape for weights in (checkpoint["model"], *extras.values()) for tensor in weights.values()]
    problem = optimizer_problem(checkpoint["opt"], shapes)
    if problem is None and checkpoint.get("rng"):
        problem = rng_problem(checkpoint["rng"])
    scaler = checkpoint.get("scaler")
    if problem is None and scaler and not (isinstance(scaler, dict) and all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in scaler.values())):
        problem = "its fp16 loss scaler state is not a dict of numbers"
    return problem


def check_train_checkpoint(checkpoint: dict, source: str) -> None:
    """CheckpointError naming `source` when a checkpoint to resume holds an unusable model config, counters,
    weights, optimizer, RNG or scaler state; checked before anything is built from it."""
    problem = train_checkpoint_problem(checkpoint)
    if problem is not None:
        raise download.CheckpointError(f"cannot resume {source}: {problem}")


def check_epoch_position(checkpoint: dict, source: str, batches_per_epoch: int) -> None:
    """CheckpointError when the checkpoint's position in its epoch lies past this data's epoch."""
    if checkpoint.get("epoch_step", 0) > batches_per_epoch:
        raise download.CheckpointError(f"cannot resume {source}: its epoch_step {checkpoint['epoch_step']} lies past "
                                       f"the {batches_per_epoch} batches of an epoch of this data")


# Building the model a checkpoint holds

def model_config_of(checkpoint: dict, source: str) -> dict:
    """SiT constructor arguments (every models.ModelConfig key): the stored "model_config", else read from the
    parameter shapes; CheckpointError naming `source` when they are not sane, before any allocation."""
    if "model_config" in checkpoint:
        config = checkpoint["model_config"]
    else:
        try:
            config = models.model_config_from_state_dict(download.state_dict_of(checkpoint))
        except (ValueError, KeyError, AttributeError, TypeError, IndexError) as error:
            raise download.CheckpointError(f"{source} does not hold SiT weights ({error})") from None
    problem = model_config_problem(config)
    if problem is not None:
        raise download.CheckpointError(f"refused to build the model of {source}: {problem}")
    return models.ModelConfig.from_dict(config).to_dict()  # an older config: the keys it lacks take their defaults


def model_shape_name(config: dict) -> str:
    """What folders call a SiT of this config: its published name (SiT-S/2), else custom-d<D>-w<W>-p<P>."""
    return (models.model_name_for_config(config)
            or f"custom-d{config['depth']}-w{config['hidden_size']}-p{config['patch_size']}")


def checkpoint_info(config: dict, settings: dict) -> dict:
    """What a checkpoint says about itself: name, image size, classes, channels, VAE, transport."""
    vae = settings.get("vae")
    space = recorded_latent_space(vae)  # not loaded: its geometry only
    # a model with pixels' channels that its recorded space (or SD-VAE, without a record) lacks learns pixels
    if config["in_channels"] == PixelSpace.channels and space.channels != PixelSpace.channels:
        space = PixelSpace()
    # only the settings the args hold: a missing key means "unknown", not None
    transport = {key: settings[key] for key in TRANSPORT_KEYS if key in settings} or None
    return {"model_name": models.model_name_for_config(config),
            "image_size": space.image_size(config["input_size"]), "num_classes": config["num_classes"],
            "in_channels": config["in_channels"], "pixel_space": space.pixel_space, "vae": vae,
            "transport": transport}


def stored_latent_statistics(checkpoint: dict, source: str, channels: int) -> Optional[LatentStatistics]:
    """The statistics a --latent-norm per-channel model learned its latents normalised by (None: constant, as
    every older checkpoint); CheckpointError when they are missing or unusable."""
    if settings_of(checkpoint).get("latent_norm", CONSTANT) != PER_CHANNEL:
        return None
    try:
        return LatentStatistics.from_dict(checkpoint.get("latent_statistics"), source,
                                          "its model learned per-channel normalised latents and cannot be decoded "
                                          "without them", channels=channels)
    except UsageError as error:
        raise download.CheckpointError(str(error)) from None


def check_request(info: dict, config: dict, model_name: Optional[str], image_size: Optional[int],
                  num_classes: Optional[int]) -> None:
    """Raise CheckpointError when the user's --model/--image-size/--num-classes contradict the checkpoint."""
    if model_name is not None and model_name not in models.SiT_models:
        raise download.CheckpointError(f"unknown --model {model_name!r}; choose one of {', '.join(models.SiT_models)}")
    downsampling = info["image_size"] // config["input_size"]  # the recorded latent space's
    if image_size is not None and image_size % downsampling:
        raise download.CheckpointError(f"--image-size must be a multiple of {downsampling} for this latent model (its "
                                       f"space downsamples by {downsampling}), got {image_size}; the checkpoint "
                                       f"was trained at {info['image_size']}")
    shape = (config["depth"], config["hidden_size"], config["patch_size"])
    if model_name is not None and tuple(models.MODEL_SHAPES[model_name][:3]) != shape:
        raise download.CheckpointError(f"--model {model_name} but the checkpoint holds "
                                       f"{info['model_name'] or 'a custom SiT'} (depth {shape[0]}, width {shape[1]}, "
                                       f"patch {shape[2]})")
    if image_size is not None and image_size != info["image_size"]:
        raise download.CheckpointError(f"--image-size {image_size} but the checkpoint was trained at "
                                       f"{info['image_size']}")
    if num_classes is not None and num_classes != info["num_classes"]:
        raise download.CheckpointError(f"--num-classes {num_classes} but the checkpoint has {info['num_classes']} "
                                       f"classes")


def load_model(ckpt: Optional[str | os.PathLike], model_name: Optional[str] = None, image_size: Optional[int] = None,
               num_classes: Optional[int] = None) -> tuple[models.SiT, dict]:
    """The SiT a checkpoint holds, in eval mode with its (EMA) weights, and what it knows about itself.

    ckpt: published name, hub file, URL or path; None means the published checkpoint of model_name
    (SiT-XL/2 by default) at image_size (256 by default). model_name / image_size / num_classes: what the
    user asked for, or None to take the checkpoint's; a contradiction raises CheckpointError naming both, an
    argument of the wrong type or range a TypeError/ValueError naming it, non-finite weights CheckpointError.
    Returns (model on the CPU, info) with info = {"model_name", "image_size", "num_classes", "in_channels",
    "pixel_space", "vae", "transport" (the args' TRANSPORT_KEYS; None without), "latent_statistics"}.
    """
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
    source = download.published_model(model_name, image_size, num_classes) if ckpt is None else os.fspath(ckpt)
    checkpoint = download.load_checkpoint(source)
    config = model_config_of(checkpoint, source)
    info = checkpoint_info(config, settings_of(checkpoint))
    info["latent_statistics"] = stored_latent_statistics(checkpoint, source, config["in_channels"])
    check_request(info, config, model_name, image_size, num_classes)
    weights = download.state_dict_of(checkpoint)
    bad = non_finite_tensor(weights)
    if bad is not None:
        raise download.CheckpointError(f"the weights in {source} are not finite: {bad}; sample from an earlier "
                                       f"checkpoint (training diverged?)")
    model = models.SiT(**config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in lines[1:3])[:300]  # skip "Error(s) in loading state_dict"
        raise download.CheckpointError(f"the weights in {source} do not fit the model they describe: {detail}") from None
    return model.eval(), info
