"""train.py's settings as typed configuration, resolved once from the command line and (on resume) the checkpoint.

Each setting is declared once, as a field of its group's dataclass (sit.declarations), with its flag and its
resume rule (LOCKED: what the model is and learns; WARN: the VAE, the data order, lr and EMA decay;
FREE: --sharding; no rule: the command line's). `resolve_train_settings` is the only place a flag meets a
checkpoint's value. The flags are argparse's values (`vars(args)`, the original's defaults), never modified.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import AbstractSet, Any, ClassVar, Mapping, Optional

from models import ModelConfig, SiT_models, has_null_class, model_design
from sit.checkpoint import TRANSPORT_KEYS, model_config_problem, model_shape_name
from sit.cli import (add_speed_arguments, decay_rate, guidance_scale, non_negative_float, non_negative_int,
                     positive_float, positive_int)
from sit.config import FREE, LOCKED, RUN_CHANGE, Resolved, Rule, Setting, TransportConfig, resolve_settings
from sit.declarations import Needs, add_flags, canonical_values, check_needs, declare, resume_rules
from sit.distributed import launched_by_torchrun
from sit.errors import UsageError
from sit.speed import default_device_type, resolve_precision_choice
from sit.training.lr_schedule import CONSTANT, INVERSE_SQRT, LR_SCHEDULES, WARMUP_COSINE, check_schedule
from sit.training.registry import FEATURES, feature_settings
from sit.training.sharding import SHARDINGS
from train_utils import parse_transport_args
from transport.schedules import LOGIT_NORMAL, TIME_SAMPLINGS, TimeSchedule
from sit.latents import (LATENT_SPACES, LatentSpace, canonical_latent_space_name, check_latent_space_name,
                         recorded_latent_space)
from sit.latents.statistics import CONSTANT as CONSTANT_NORM, LATENT_NORMS, PER_CHANNEL

MODEL_CONFIG_KEYS = ModelConfig.network_keys()  # --model-config's: the data (flags) sets input size, channels, classes
EMA_DECAY = 0.9999  # default of --ema-decay (the paper's)
NEWEST = "newest"  # `--resume` with no value

VAE_CONFLICT = ("{flag} {given} but {source} was trained with {flag} {held}; a model learns either pixels "
                "(--vae none) or VAE latents of one shape (channels, downsampling): drop the flag or start a new "
                "experiment")
VAE_WARNING = ("{flag} {given} replaces the checkpoint's {held}: fine for a copy of the same VAE (or ema/mse, which "
               "share the encoder); another encoder changes what the model learns")
DATA_ORDER_WARNING = "{flag} {given} differs from the checkpoint's {held}: the data order will not match an uninterrupted run"

MODEL_KEYS = ("model", "model_config", "image_size", "num_classes")


def other_latent_shape(given: str, held: str) -> bool:
    """Whether a resumed run's --vae learns another shape than the checkpoint's: pixels or latents, and
    latents' channels and downsampling where both are known (a recorded path not on this machine is not)."""
    spaces = [recorded_latent_space(name) for name in (given, held)]
    if spaces[0].pixel_space != spaces[1].pixel_space:
        return True
    known = all(isinstance(name, str) and (name in LATENT_SPACES or os.path.exists(name)) for name in (given, held))
    return known and len({(space.channels, space.downsampling) for space in spaces}) > 1


SAME_OVERRIDES = dataclasses.replace(LOCKED, same=lambda given, held: same_model_config(given, held))
VAE_RULE = Setting(Rule.WARN, conflict=VAE_CONFLICT, warning=VAE_WARNING,
                   incompatible=other_latent_shape)
DATA_ORDER = Setting(Rule.WARN, warning=DATA_ORDER_WARNING)
MEASURING_FID = Needs("--fid-every N (FID while training)", lambda settings: settings.fid_every is not None)
SCHEDULED_LR = Needs(f"--lr-schedule {WARMUP_COSINE} or {INVERSE_SQRT}",
                     lambda settings: settings.lr_schedule != CONSTANT)
LOGIT_NORMAL_TIMES = Needs(f"--time-sampling {LOGIT_NORMAL}", lambda settings: settings.time_sampling == LOGIT_NORMAL)


@dataclass(frozen=True)
class ModelSettings:
    """What the model is: --model, --model-config (JSON text as given), --image-size, --num-classes, --vae."""
    model: str = declare("SiT-XL/2", "the model's shape", choices=list(SiT_models), resume=LOCKED)
    model_config: Optional[str] = declare(
        None, "JSON overriding the --model shape, for tests and experiments, e.g. "
              "'{\"depth\": 1, \"hidden_size\": 32, \"num_heads\": 2}'; keys: " + ", ".join(MODEL_CONFIG_KEYS),
        resume=SAME_OVERRIDES)
    image_size: int = declare(256, "a multiple of 8 (256 or 512 in the paper); with --vae none any size the patch "
                                   "size divides", type=positive_int, resume=LOCKED)
    num_classes: int = declare(1000, "class labels of the model", type=positive_int, resume=LOCKED)
    vae: str = declare("ema", "ema, mse or a local diffusers AutoencoderKL folder (the choice hardly affects "
                              "training); none: train on pixels in [-1, 1] without a VAE; vavae-f16d32 or a "
                              "VA-VAE .pt file, e2e-vavae, e2e-invae, e2e-sdvae: docs/latent_spaces.md",
                       canonical=canonical_latent_space_name, resume=VAE_RULE)
    latent_norm: str = declare(CONSTANT_NORM, "what the model learns of the raw latents: constant, the latent space's "
                                         "own scale (SD-VAE: x 0.18215, the original's); per-channel, (z - mean_c) / "
                                         "std_c with the statistics extract_features.py measured (needs --feature-path "
                                         "or a checkpoint that carries them; not with --vae none)",
                               choices=list(LATENT_NORMS), resume=LOCKED)

    def folder_tag(self) -> Optional[str]:
        """The experiment folder's mark of a table latent space other than SD-VAE's or pixels (a local VAE
        folder is an SD-VAE copy: unmarked), and of per-channel statistics."""
        tags = [f"vae-{self.vae}" if self.vae in LATENT_SPACES and self.vae not in ("ema", "mse", "none") else None,
                "latent-per-channel" if self.latent_norm == PER_CHANNEL else None]
        return "-".join(filter(None, tags)) or None

    @property
    def space(self) -> LatentSpace:
        """The latent space --vae names (not loaded: its geometry)."""
        return recorded_latent_space(self.vae)

    @property
    def pixel_space(self) -> bool:
        return self.space.pixel_space

    @property
    def shape_name(self) -> str:
        """The model's name in the experiment folder: --model, or with --model-config the real shape's."""
        return self.model if self.model_config is None else model_shape_name(self.sit_kwargs())

    def sit_kwargs(self) -> dict:
        """SiT constructor arguments: the latent space's input, the --model design, then --model-config's
        overrides (UsageError for a bad one)."""
        space = self.space
        config = dict(input_size=space.input_size(self.image_size), in_channels=space.channels,
                      **model_design(self.model), num_classes=self.num_classes)
        config.update(parse_model_config(self.model_config))
        return config


@dataclass(frozen=True)
class DataSettings:
    """Where the images (or cached latents) come from and in which order."""
    data_path: Optional[str] = declare(None, "an ImageFolder: <root>/<class>/<image>", one_of="data")
    feature_path: Optional[str] = declare(
        None, "instead of --data-path: latents cached by extract_features.py; no VAE is loaded (--vae then only "
              "decodes the preview grids, loaded on rank 0 at the first one)", one_of="data")
    global_batch_size: int = declare(256, "images per step over all processes", type=positive_int, resume=DATA_ORDER)
    global_seed: int = declare(0, "seeds the model's initialisation, the data order and the noise", type=int,
                               resume=DATA_ORDER)
    random_flip: bool = declare(True, "flip training images horizontally at random (the paper's); --no-random-flip "
                                      "for data that flipping changes, such as digits",
                                action=argparse.BooleanOptionalAction, resume=DATA_ORDER)
    num_workers: int = declare(4, "data loading processes per GPU", type=non_negative_int)


@dataclass(frozen=True)
class OptimSettings:
    """How long and how the weights are optimised (--precision and --compile: sit.cli's speed flags)."""
    epochs: int = declare(1400, "passes over the data at most", type=positive_int)
    max_steps: Optional[int] = declare(None, "stop after this many steps in all", type=positive_int)
    lr: float = declare(1e-4, "AdamW learning rate (the peak of --lr-schedule)", type=positive_float,
                        resume=RUN_CHANGE)
    # the schedule and weight decay: the checkpoint's unless given, a new value warns (the run then differs);
    # the lr of each step is a function of the step count alone (sit/training/lr_schedule.py), so a resume is exact
    weight_decay: float = declare(0.0, "AdamW weight decay (decoupled; 0: none, the original's)",
                                  type=non_negative_float, resume=RUN_CHANGE)
    lr_schedule: str = declare(CONSTANT, "constant: --lr throughout (the original's); warmup-cosine: linear warmup "
                                         "over --warmup-steps, then a cosine to 0 at --max-steps; inverse-sqrt: "
                                         "linear warmup, then --lr x sqrt(warmup / step)", choices=LR_SCHEDULES,
                               resume=RUN_CHANGE)
    warmup_steps: int = declare(0, "steps of linear lr warmup of --lr-schedule (inverse-sqrt: also where its decay "
                                   "starts)", type=non_negative_int, resume=RUN_CHANGE, needs=SCHEDULED_LR)
    ema_decay: float = declare(EMA_DECAY, "decay of the EMA weights per step", type=decay_rate, resume=RUN_CHANGE)
    max_grad_norm: Optional[float] = declare(None, "clip the gradient norm to this (default: no clipping); the norm "
                                                   "is logged", type=positive_float)
    grad_checkpointing: bool = declare(False, "recompute each block in the backward pass: less memory, about a "
                                              "third more compute", action="store_true")
    precision: str = "tf32"
    compile: bool = False
    sharding: str = declare("ddp", "ddp: a full copy of model, gradients, AdamW and EMA per GPU (the original's); "
                                   "fsdp: FSDP2 shards all four over the GPUs (with --precision bf16: bf16 weights, "
                                   "fp32 gradient reduction); checkpoints are the same full files either way",
                            choices=SHARDINGS, resume=FREE)  # either mode resumes the other's checkpoints exactly

    def __post_init__(self) -> None:
        check_schedule(self.lr_schedule, self.warmup_steps, self.max_steps)  # e.g. a cosine without --max-steps


@dataclass(frozen=True)
class RunSettings:
    """Where the run writes, how often, and where it starts from."""
    results_dir: str = declare("results", "where experiment folders are made")
    exp_name: Optional[str] = declare(None, "name the experiment folder <NNN>-<EXP_NAME> (default: the model, "
                                            "transport and the options that change what it learns)")
    log_every: int = declare(100, "steps between log lines", type=positive_int)
    ckpt_every: int = declare(50_000, "steps between checkpoints", type=positive_int)
    background_checkpoints: bool = declare(False, "write each checkpoint from a CPU copy of the state (pinned on "
                                                  "GPUs) in a background thread while training goes on (the same "
                                                  "atomic file; one more copy of the state in CPU memory)",
                                           action="store_true")
    sample_every: int = declare(10_000, "steps between EMA preview grids", type=positive_int)
    cfg_scale: float = declare(4.0, "guidance of the preview samples, >= 1 (1: none)", type=guidance_scale)
    wandb: bool = declare(False, "log to Weights & Biases (env: WANDB_KEY optional, ENTITY, PROJECT)",
                          action="store_true")
    ckpt: Optional[str] = declare(None, "a train.py checkpoint to resume, or weights (path, URL, published name) "
                                        "to fine-tune")
    resume: Optional[str] = declare(None, "resume an experiment folder's newest checkpoint; alone: the newest "
                                          "experiment in --results-dir", nargs="?", const=NEWEST)


@dataclass(frozen=True)
class FIDSettings:
    """FID while training (--fid-every None: never)."""
    TITLE: ClassVar[str] = "FID while training (evaluate.py's definitions)"
    fid_every: Optional[int] = declare(None, "measure FID every N steps (default: never)", type=positive_int)
    fid_num_samples: int = declare(10_000, "EMA samples per measurement, over all ranks", type=positive_int,
                                   needs=MEASURING_FID)
    fid_ref: Optional[str] = declare(None, "reference statistics: an ADM reference batch with mu/sigma, or the "
                                           ".stats.npz evaluate.py caches", needs=MEASURING_FID)
    fid_steps: int = declare(50, "Euler ODE steps of the FID samples (MeanFlow runs: jumps, e.g. 1 or 2)",
                             type=positive_int, needs=MEASURING_FID)
    fid_cfg_scale: float = declare(1.0, "guidance of the FID samples, >= 1", type=guidance_scale, needs=MEASURING_FID)
    fid_inception_weights: Optional[str] = declare(None, "a local Inception weights file (default: downloaded once "
                                                         "by torch-fidelity)", needs=MEASURING_FID)


@dataclass(frozen=True)
class TimeSettings:
    """How training draws t (transport.schedules)."""
    TITLE: ClassVar[str] = "time-step schedule of training (transport/schedules.py; t=0 noise, t=1 data)"
    time_sampling: str = declare("uniform", "how t is drawn: uniform (the original's) or logit-normal (SD3, "
                                            "LightningDiT)", choices=TIME_SAMPLINGS, resume=RUN_CHANGE)
    time_mean: float = declare(0.0, "mean of the logit-normal's normal", type=float, resume=RUN_CHANGE,
                               needs=LOGIT_NORMAL_TIMES)
    time_std: float = declare(1.0, "std of the logit-normal's normal", type=positive_float, resume=RUN_CHANGE,
                              needs=LOGIT_NORMAL_TIMES)
    time_shift: Optional[float] = declare(None, "shift t -> t / (t + s (1 - t)); s > 1 draws more times near the "
                                                "noise end (default: none)", type=positive_float, resume=RUN_CHANGE)

    def folder_tag(self) -> Optional[str]:
        """The experiment folder's mark of a schedule other than the original's: logitnormal, shift3, ..."""
        parts = []
        if self.time_sampling == LOGIT_NORMAL:
            default = (self.time_mean, self.time_std) == (0.0, 1.0)
            parts.append("logitnormal" + ("" if default else f"{self.time_mean:g}_{self.time_std:g}"))
        if self.time_shift is not None:
            parts.append(f"shift{self.time_shift:g}")
        return "-".join(parts) or None

    def schedule(self) -> Optional[TimeSchedule]:
        """The transport's time schedule; None for the original's uniform draw (unchanged numbers)."""
        schedule = TimeSchedule(self.time_sampling, self.time_mean, self.time_std, self.time_shift)
        return None if schedule.is_original else schedule


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is configured with; `settings()` is its flat form (checkpoint "args", log)."""
    model: ModelSettings
    transport: TransportConfig
    data: DataSettings
    optim: OptimSettings
    run: RunSettings
    fid: FIDSettings
    time: TimeSettings
    features: Mapping[str, Any]  # each registered feature's settings by name (sit.training.registry)

    @classmethod
    def from_settings(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """From a flat dict keyed by the flags' destinations (every one of them, nothing else)."""
        groups = {name: group(**{item.name: values[item.name] for item in dataclasses.fields(group)})
                  for name, group in GROUP_TYPES.items()}
        used = {field.name for group_type in setting_groups() for field in dataclasses.fields(group_type)}
        if set(values) != used:
            raise ValueError(f"settings without a place in TrainConfig: {sorted(set(values) - used)}")
        return cls(**groups, features=feature_settings(values))

    def settings(self) -> dict:
        """The flat dict of every setting, keyed by flag destination (JSON-serialisable)."""
        groups = [*(getattr(self, group) for group in GROUP_TYPES), *filter(None, self.features.values())]
        return {key: value for group in groups for key, value in dataclasses.asdict(group).items()}

    def folder_name(self) -> str:
        """The experiment folder's name after its index: --exp-name, else <model>-<path>-<prediction>-<loss
        weight> (the original's) and a mark of each option that changes what the model learns."""
        if self.run.exp_name is not None:
            return self.run.exp_name
        transport = self.transport
        tags = [group.folder_tag() for group in (self.model, self.time, *self.features.values())
                if hasattr(group, "folder_tag")]
        return "-".join([self.model.shape_name.replace("/", "-"), transport.path_type, transport.prediction,
                         str(transport.applied_loss_weight), *filter(None, tags)])

    @staticmethod
    def defaults() -> dict:
        """Every setting's default, flat (as settings() keys them)."""
        return {item.name: item.default for group in setting_groups() for item in dataclasses.fields(group)}

    @property
    def token_encoder(self) -> Optional[str]:
        """The encoder whose tokens a feature needs with the batches (cached latents must hold them), or None."""
        encoders = [getattr(settings, "token_encoder", None) for settings in self.features.values()]
        return next((encoder for encoder in encoders if encoder is not None), None)


# TrainConfig's field -> the dataclass of that group (the features' groups come from sit.training.registry)
GROUP_TYPES = {"model": ModelSettings, "transport": TransportConfig, "data": DataSettings, "optim": OptimSettings,
               "run": RunSettings, "fid": FIDSettings, "time": TimeSettings}


def setting_groups() -> list[type]:
    """Every settings dataclass of a run: TrainConfig's groups, then each registered feature's."""
    return [*GROUP_TYPES.values(), *(feature.settings for feature in FEATURES.values() if feature.settings)]


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """train.py's flags: the groups above, each feature's, the speed flags and the transport flags."""
    for group in (DataSettings, ModelSettings, OptimSettings, RunSettings, FIDSettings, TimeSettings,
                  *setting_groups()[len(GROUP_TYPES):]):  # then REPA, post-hoc EMA, self-healing, ...
        add_flags(parser, group)
    add_speed_arguments(parser)
    parse_transport_args(parser)


def parse_model_config(text: Optional[str]) -> dict:
    """The --model-config JSON as a dict of SiT arguments ({} when not given); UsageError when unusable."""
    if text is None:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--model-config is not valid JSON ({error})") from None
    if not isinstance(overrides, dict):
        raise UsageError("--model-config must be a JSON object, e.g. '{\"depth\": 2}'")
    unknown = sorted(set(overrides) - set(MODEL_CONFIG_KEYS))
    if unknown:
        raise UsageError(f"--model-config: unknown key(s) {', '.join(unknown)}; valid: {', '.join(MODEL_CONFIG_KEYS)}")
    for key, value in overrides.items():
        if ModelConfig.value_problem(key, value) is not None:
            raise UsageError(f"--model-config: {key} must be {ModelConfig.requirement(key)}, got {json.dumps(value)}")
    return overrides


def same_model_config(given: Optional[str], held: Optional[str]) -> bool:
    """Two --model-config texts ask for the same overrides (JSON compared as data, not as text)."""
    return (parse_model_config(given) if given else {}) == (parse_model_config(held) if held else {})


def checkpoint_owned_settings(flags: Mapping[str, Any], train_steps: int) -> dict[str, Setting]:
    """The settings a checkpoint can give, by their declared rules (the transport's: locked)."""
    table = {key: dataclasses.replace(LOCKED, default=flags[key]) for key in TRANSPORT_KEYS}
    for group in setting_groups():
        if group is not TransportConfig:
            table.update(resume_rules(group, flags))
    return {key: dataclasses.replace(setting, warning=setting.warning.replace("{step}", str(train_steps)))
            for key, setting in table.items()}


def resolve_train_settings(flags: Mapping[str, Any], explicit: AbstractSet[str],
                           stored: Optional[Mapping[str, Any]] = None, *, source: str = "the checkpoint",
                           train_steps: int = 0, features_vae: Optional[str] = None) -> tuple[TrainConfig, Resolved]:
    """The run's configuration, and the resolution of the settings a checkpoint can give (values, origins,
    warnings). flags: every parsed flag; explicit: those the command line gave; stored: the resumed
    checkpoint's settings (None: a new run); train_steps: its step; features_vae: the VAE of --feature-path's
    features (decodes the previews unless --vae is given). UsageError when a flag contradicts the checkpoint.
    """
    for group in setting_groups():
        flags = canonical_values(group, flags)  # e.g. a VAE folder or encoder file named wherever the run starts
    table = checkpoint_owned_settings(flags, train_steps)
    resolved = resolve_settings(table, {key: flags[key] for key in table if key in explicit}, stored, source=source)
    values = dict(flags, **resolved.values)
    # --precision auto: the hardware's choice, resolved alike at every start on this kind of machine, stored resolved
    values["precision"] = resolve_precision_choice(values["precision"], default_device_type())
    for key in MODEL_KEYS + TRANSPORT_KEYS:  # what the model is: the checkpoint's, even as a different spelling
        if stored is not None and key in stored:
            values[key] = stored[key]
    if features_vae and "vae" not in explicit and not recorded_latent_space(values["vae"]).pixel_space:
        values["vae"] = features_vae  # pixels with features are refused by check_train_config
    config = TrainConfig.from_settings(values)
    for settings in [*(getattr(config, group) for group in GROUP_TYPES), *config.features.values()]:
        if settings is not None and dataclasses.is_dataclass(settings):
            check_needs(settings, explicit)  # flags that would do nothing without another
    return config, resolved


def check_train_config(config: TrainConfig, world_size: int) -> None:
    """UsageError (one line naming the flag) for settings that cannot work, before any heavy work."""
    model, data, fid = config.model, config.data, config.fid
    if data.feature_path is not None and model.pixel_space:
        raise UsageError("--feature-path holds VAE latents; --vae none trains on pixels: use --data-path with --vae none")
    if model.pixel_space and model.latent_norm == PER_CHANNEL:
        raise UsageError("--latent-norm per-channel normalises VAE latents by their measured statistics; --vae none "
                         "trains on pixels in [-1, 1] as they are: drop --latent-norm")
    model.space.check_image_size(model.image_size)
    name = config.run.exp_name
    if name is not None and (not name.strip() or os.sep in name or name.startswith(".") or name != name.strip()):
        raise UsageError(f"--exp-name {name!r}: a folder name (no '/', not empty, not starting with '.')")
    if data.global_batch_size % world_size:
        raise UsageError(f"--global-batch-size {data.global_batch_size} is not divisible by the {world_size} processes")
    if config.optim.sharding == "fsdp" and not launched_by_torchrun():
        raise UsageError("--sharding fsdp shards over the processes of a torchrun job (e.g. torchrun "
                         "--nproc_per_node=8 train.py ... --sharding fsdp); one plain process holds the whole model anyway")
    check_latent_space_name(model.vae)
    kwargs = model.sit_kwargs()
    if kwargs["input_size"] % kwargs["patch_size"]:
        what = "pixels" if model.pixel_space else "latents"
        raise UsageError(f"--image-size {model.image_size} gives {kwargs['input_size']}x{kwargs['input_size']} {what}, "
                         f"not divisible by the patch size {kwargs['patch_size']}")
    if kwargs["hidden_size"] % kwargs["num_heads"]:
        raise UsageError(f"hidden size {kwargs['hidden_size']} is not divisible by {kwargs['num_heads']} heads (--model "
                         f"{model.model}{' with --model-config' if model.model_config else ''}): set num_heads in "
                         f"--model-config to a divisor of hidden_size")
    problem = model_config_problem(kwargs)  # absurd sizes: refused before the model is built on the CPU
    if problem is not None:
        raise UsageError(f"--model {model.model} with --model-config: {problem}")
    config.transport.build()
    if fid.fid_every is not None and (fid.fid_ref is None or not os.path.isfile(fid.fid_ref)):
        raise UsageError(f"--fid-every needs --fid-ref, a file of reference statistics (got {fid.fid_ref!r}); "
                         f"make one with `python evaluate.py VIRTUAL_imagenet256_labeled.npz`")
    if fid.fid_every is not None and fid.fid_cfg_scale > 1.0 and not has_null_class(kwargs):
        raise UsageError(f"--fid-cfg-scale {fid.fid_cfg_scale} needs a model with label dropout (its null class), but "
                         f"class_dropout_prob is 0: use --fid-cfg-scale 1")
    for settings in config.features.values():
        if hasattr(settings, "check"):
            settings.check(config)
        if config.optim.sharding == "fsdp" and hasattr(settings, "DDP_ONLY") and settings.enabled:
            flags, reason = settings.DDP_ONLY  # it keeps whole tensors, which FSDP2's ranks do not hold
            raise UsageError(f"{flags} works with --sharding ddp only ({reason}): drop --sharding fsdp "
                             f"or {flags}")
