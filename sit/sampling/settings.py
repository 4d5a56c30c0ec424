"""Typed configuration of a sampling run: `SamplingConfig` from the parsed flags (`sampling_config`, every
check across flags) and `ModelSettings` from it and the checkpoint (`resolve_model_settings`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from sit.config import TRANSPORT_SETTINGS, GuidanceConfig, SamplerFamily, TransportConfig, resolve_settings
from sit.errors import UsageError
from sit.latents import LATENT_SPACES, canonical_latent_space_name, recorded_latent_space
from sit.latents.statistics import LatentStatistics, same_latents
from sit.sampling.families import SAMPLER_FAMILIES, family
from sit.speed import AUTO, default_device_type, resolve_precision_choice
from sit.training.experiment import checkpoint_in_folder

# flag -> (destination, its default); each is read only with --likelihood
LIKELIHOOD_FLAGS = {"--data-path": ("data_path", None), "--dequantize": ("dequantize", None),
                    "--num-probes": ("num_probes", 1), "--exact-trace": ("exact_trace", False)}


@dataclass(frozen=True)
class ModelRequest:
    """What the command line asks of the model; None (or a transport key not given): the checkpoint's."""
    ckpt: Optional[str] = None
    model_name: Optional[str] = None
    image_size: Optional[int] = None
    num_classes: Optional[int] = None
    vae: Optional[str] = None
    transport: Mapping[str, Any] = field(default_factory=dict)  # only the transport flags given explicitly
    ckpt_choice: Optional[str] = None  # --ckpt named a folder: which checkpoint in it was taken, for the log


@dataclass(frozen=True)
class LikelihoodConfig:
    """--likelihood: what to evaluate (--data-path, else fresh samples) and how."""
    data_path: Optional[str] = None
    dequantize: Optional[str] = None  # pixel-space models only; None: the default, uniform
    num_probes: int = 1
    exact_trace: bool = False

    @property
    def dequantization(self) -> str:
        return self.dequantize or "uniform"


@dataclass(frozen=True)
class SamplingConfig:
    """Everything the flags say about a sampling run."""
    request: ModelRequest
    sampler: SamplerFamily
    guidance: GuidanceConfig
    precision: str = "tf32"
    compile: bool = False
    seed: int = 0            # sample.py: the global torch seed; sample_ddp.py: the per-index seeds' global seed
    num_images: int = 1
    batch_size: int = 1      # images sampled as one batch (sample_ddp.py: a block of indices)
    likelihood: Optional[LikelihoodConfig] = None
    warnings: tuple[str, ...] = ()  # flags given that this run does not use (logged once by the script)
    label_sampling: str = "random"  # sample_ddp.py --label-sampling (sit.generation.LABEL_SAMPLINGS)


@dataclass(frozen=True)
class ModelSettings:
    """The model that samples, as the request and the checkpoint together say; vae None: pixel space."""
    name: str
    ckpt: Optional[str]
    image_size: int
    num_classes: int
    vae: Optional[str]
    transport: TransportConfig
    latent_statistics: Optional[LatentStatistics] = None  # a --latent-norm per-channel checkpoint's: decoding uses them


def resolve_precision(tf32: Optional[bool], precision: Optional[str]) -> str:
    """--precision from itself and the older --tf32/--no-tf32 (default tf32); contradictions are UsageErrors."""
    if tf32 is False:
        if precision not in (None, "fp32"):
            raise UsageError(f"--no-tf32 means --precision fp32, which contradicts --precision {precision}")
        return "fp32"
    if tf32 is True and precision in ("fp32", AUTO):
        raise UsageError(f"--tf32 contradicts --precision {precision} (pass one of them)")
    # the original's: fp32 weights, TF32 matmuls on GPUs; auto: the hardware's choice, stored as such
    return resolve_precision_choice(precision or "tf32", default_device_type())


def likelihood_config(flags: Mapping[str, Any]) -> Optional[LikelihoodConfig]:
    """The --likelihood options (None without --likelihood); a likelihood option without it is a UsageError."""
    values = {key: flags.get(key, default) for key, default in LIKELIHOOD_FLAGS.values()}
    for flag, (key, default) in LIKELIHOOD_FLAGS.items():
        if values[key] != default and not flags["likelihood"]:
            raise UsageError(f"{flag} is read only with --likelihood")
    if values["data_path"] is not None and not os.path.isdir(values["data_path"]):
        raise UsageError(f"--data-path {values['data_path']!r} is not a folder")
    if values["exact_trace"] and values["num_probes"] != 1:
        raise UsageError("--exact-trace computes the divergence without probes: drop --num-probes")
    return LikelihoodConfig(**values) if flags["likelihood"] else None


def sampling_config(flags: Mapping[str, Any], given: frozenset[str], *, seed: int, num_images: int,
                    batch_size: int, likelihood_refusal: Optional[str] = None) -> SamplingConfig:
    """The SamplingConfig of parsed flags (e.g. vars(args)) and those `given` explicitly; UsageError for a bad
    combination. likelihood_refusal: the message refusing --likelihood, for a script without it."""
    if likelihood_refusal and flags["likelihood"]:
        raise UsageError(likelihood_refusal)
    precision = resolve_precision(flags["tf32"], flags["precision"])
    # Known here: the latent space --vae names, or without --vae and --ckpt the published models' (SD-VAE).
    # With --ckpt alone the checkpoint tells (sit.checkpoint.load_model refuses the size for a latent checkpoint).
    image_size, vae = flags["image_size"], flags["vae"]
    if image_size is not None and (vae is not None or flags["ckpt"] is None):
        downsampling = recorded_latent_space(vae).downsampling  # its geometry; the name is checked when it loads
        if image_size % downsampling:
            raise UsageError(f"--image-size must be a multiple of {downsampling} for latent models (the VAE "
                             f"downsamples by {downsampling}), got {image_size}; a pixel-space checkpoint takes "
                             f"any size")
    low, high = flags["cfg_interval"]
    if low > high:
        raise UsageError(f"--cfg-interval LO HI needs LO <= HI, got {low} {high}")
    chosen = family(flags["mode"])
    if flags["num_sampling_steps"] < chosen.min_steps:
        raise UsageError(f"--num-sampling-steps must be at least {chosen.min_steps}, got {flags['num_sampling_steps']}")
    if chosen.average_velocity and flags["guide_ckpt"] is not None:
        raise UsageError(f"--guide-ckpt guides velocity models; {flags['mode']} mode samples MeanFlow models (their "
                         f"guidance is trained in, --meanflow-omega): drop --guide-ckpt")
    if flags["likelihood"] and not chosen.supports_likelihood:
        modes = " or ".join(name for name, entry in SAMPLER_FAMILIES.items() if entry.supports_likelihood)
        raise UsageError(f"--likelihood works in {modes} mode only (it integrates the probability-flow ODE)")
    if flags["likelihood"] and flags["guide_ckpt"] is not None:
        raise UsageError("--guide-ckpt guides sampling; --likelihood evaluates the unguided model: drop --guide-ckpt")
    label_sampling = flags.get("label_sampling", "random")  # sample.py has no --label-sampling
    if flags["likelihood"] and label_sampling != "random":
        raise UsageError(f"--label-sampling {label_sampling} chooses the classes of a sample batch; --likelihood "
                         f"draws its labels per image (or reads them from --data-path): drop --label-sampling")
    if flags["likelihood"] and flags["cfg_scale"] != 1.0:
        raise UsageError(f"--likelihood evaluates the unguided model: pass --cfg-scale 1 (got {flags['cfg_scale']}); "
                         f"a guided sampler has no likelihood")
    ckpt, ckpt_choice = flags["ckpt"], None
    if ckpt is not None and os.path.isdir(ckpt):  # an experiment or results folder: its newest checkpoint
        ckpt, ckpt_choice = checkpoint_in_folder(ckpt)
    request = ModelRequest(ckpt, flags["model"], image_size, flags["num_classes"], vae,
                           {key: flags[key] for key in TRANSPORT_SETTINGS if key in given}, ckpt_choice)
    guidance = GuidanceConfig(flags["cfg_scale"], flags["guide_all_channels"], tuple(flags["cfg_interval"]),
                              flags["guide_ckpt"])
    sampler = chosen.from_flags(flags)
    return SamplingConfig(request, sampler, guidance, precision, flags["compile"], seed, num_images, batch_size,
                          likelihood_config(flags), unused_flag_warnings(flags, given, sampler), label_sampling)


def unused_flag_warnings(flags: Mapping[str, Any], given: frozenset[str], sampler: SamplerFamily) -> tuple[str, ...]:
    """One line per flag given that the run will not read (accepted for the original's command lines)."""
    warnings = []
    if "loss_weight" in given:
        warnings.append(f"--loss-weight {flags['loss_weight']} is not used: it weights training losses only")
    if "train_eps" in given:
        warnings.append(f"--train-eps {flags['train_eps']} is not used: it sets the training interval; sampling "
                        f"uses --sample-eps")
    if flags["cfg_scale"] == 1.0:
        warnings += [f"--{key.replace('_', '-')} is not used: --cfg-scale 1 means no guidance "
                     f"(pass a scale above 1)" for key in ("cfg_interval", "guide_all_channels", "guide_ckpt")
                     if key in given]
    warnings += sampler.unused_flags(given, flags["likelihood"])
    return tuple(warnings)


def resolve_vae(requested: Optional[str], info: Mapping[str, Any], default: str) -> Optional[str]:
    """chosen_vae's choice; UsageError when that space's channels are not the model's (e.g. a VAE folder
    that now holds another autoencoder)."""
    vae = chosen_vae(requested, info, default)
    channels = recorded_latent_space(vae).channels if vae is not None else info["in_channels"]
    if channels != info["in_channels"]:
        raise UsageError(f"--vae {vae} gives {channels}-channel latents but the checkpoint's model takes "
                         f"{info['in_channels']}: pass --vae with the autoencoder it was trained with")
    return vae


def chosen_vae(requested: Optional[str], info: Mapping[str, Any], default: str) -> Optional[str]:
    """The latent space (--vae name) to decode with, None in pixel space (info: sit.checkpoint.load_model's):
    --vae, else the checkpoint's when the script's default cannot stand in for it (a local folder that exists
    or a space of another kind), else the default (either SD-VAE decodes any SD-VAE latent)."""
    requested_pixels = requested is not None and recorded_latent_space(requested).pixel_space
    if info["pixel_space"] and requested is not None and not requested_pixels:
        raise UsageError(f"--vae {requested} but the checkpoint is a pixel-space model (trained with "
                         f"--vae none, 3 channels): drop --vae")
    if info["pixel_space"]:
        return None
    if requested_pixels:
        raise UsageError(f"--vae {requested} but the checkpoint's model works on {info['in_channels']}-channel "
                         f"VAE latents: pass --vae ema, mse or a VAE folder, or drop --vae")
    stored = info["vae"]
    if info.get("latent_statistics") is not None and isinstance(stored, str):  # the statistics are of stored's latents
        if requested is not None and not same_latents(canonical_latent_space_name(requested), stored):
            raise UsageError(f"--vae {requested} but the checkpoint's model learned the latents of {stored} normalised "
                             f"by their per-channel statistics: drop --vae (or pass where that autoencoder is now)")
    if requested is not None:
        return requested
    if not isinstance(stored, str):
        return default
    if stored in LATENT_SPACES:
        return default if LATENT_SPACES[stored] is LATENT_SPACES.get(default) else stored
    # a folder not here was SD-VAE's copy: the default decodes; a checkpoint file of another space is kept
    another_kind = type(recorded_latent_space(stored)) is not LATENT_SPACES.get(default)
    if os.path.isdir(stored) or another_kind:
        return stored  # a file of another kind that is gone: its loader names it and where to get it
    if info.get("latent_statistics") is not None:  # the default is not the autoencoder these statistics are of
        raise UsageError(f"the checkpoint's latent space {stored} is not here, and its per-channel "
                         f"statistics belong to that autoencoder: pass --vae with where it is now")
    return default


def check_balanced_count(config: SamplingConfig, num_classes: int) -> None:
    """UsageError (one line) when --label-sampling balanced cannot give every class the same number of images."""
    if config.label_sampling != "balanced" or config.num_images % num_classes == 0:
        return
    below = config.num_images // num_classes * num_classes
    nearest = f"{below} or {below + num_classes}" if below else f"{num_classes}"
    raise UsageError(f"--label-sampling balanced gives every one of the {num_classes} classes the same number of "
                     f"images, so --num-fid-samples must be a multiple of {num_classes}, got {config.num_images} "
                     f"(e.g. {nearest})")


def resolve_model_settings(config: SamplingConfig, info: Mapping[str, Any], *, has_null_class: bool,
                           vae_default: str, shape_name: str = "custom") -> ModelSettings:
    """The ModelSettings of a request and the checkpoint's info (sit.checkpoint.load_model's); shape_name: the
    model's name when it has no published one. UsageError for a contradiction."""
    request = config.request
    # a path type or prediction stored as None is unknown; a loss weight of None is a real setting
    stored = {key: value for key, value in (info["transport"] or {}).items()
              if value is not None or key == "loss_weight"}
    transport = TransportConfig(**resolve_settings(TRANSPORT_SETTINGS, request.transport, stored).values)
    if config.guidance.scale > 1.0 and not has_null_class and config.guidance.guide_ckpt is None:
        raise UsageError("this model was trained without label dropout, so it has no null class for "
                         "guidance: pass --cfg-scale 1")
    check_balanced_count(config, info["num_classes"])
    return ModelSettings(name=request.model_name or info["model_name"] or shape_name, ckpt=request.ckpt,
                         image_size=info["image_size"], num_classes=info["num_classes"],
                         vae=resolve_vae(request.vae, info, vae_default), transport=transport,
                         latent_statistics=info.get("latent_statistics"))
