"""What sample.py and sample_ddp.py share: their command line, and building the model, VAE and
sampler from it (or from the checkpoint), plus the guided model call and latent decoding.

Each script keeps only its own loop. Resolution of a setting, everywhere the same:
an explicit flag that contradicts the checkpoint is an error; otherwise the flag, else the
checkpoint's value, else the original's default.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

import download
from models import SiT, SiT_models, has_null_class
from train_utils import (SAMPLING_MODES, load_vae, parse_ode_args, parse_sde_args, parse_transport_args,
                         positive_int, sample_fn_from_args, transport_from_args, LATENT_SCALE)
from train_utils import add_speed_arguments, autocast, compile_for_sampling, compile_model, configure_precision
from transport import Sampler

# The original's transport defaults, for settings neither a flag nor the checkpoint gives
TRANSPORT_DEFAULTS = {"path_type": "Linear", "prediction": "velocity", "loss_weight": None}
NOT_GIVEN = "<not given>"  # argparse default telling "flag absent" apart from an explicit "None"
SEED_STREAMS = {"image": 0, "sde": 1, "likelihood": 2, "dequantize": 3}
PIXEL_SPACE = "none"  # --vae none: a pixel-space model (in_channels 3), nothing to decode


#################################################################################
#                                 Command line                                  #
#################################################################################

def guidance_scale(value: str) -> float:
    """argparse type: a finite float >= 1 (1 means no guidance)."""
    number = float(value)
    if not (math.isfinite(number) and number >= 1.0):
        raise argparse.ArgumentTypeError(f"must be >= 1 (1 means no guidance), got {value}")
    return number


def unit_interval_float(value: str) -> float:
    """argparse type: a float in [0, 1]."""
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return number


def add_model_arguments(parser: argparse.ArgumentParser, *, vae_default: str, cfg_default: float) -> None:
    """The flags both scripts share (the original's, plus the guidance options)."""
    parser.add_argument("mode", choices=SAMPLING_MODES, help="sampler: ODE (probability flow) or SDE; must come first")
    parser.add_argument("--model", type=str, choices=list(SiT_models), default=None,
                        help="model size (default: the checkpoint's, else SiT-XL/2)")
    parser.add_argument("--vae", type=str, default=None,
                        help=f"ema, mse or a local diffusers AutoencoderKL folder "
                             f"(default: the checkpoint's local VAE folder, else {vae_default}); pixel-space "
                             f"checkpoints (trained with --vae none) need none")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="image size, a multiple of 8 unless --vae none (default: the checkpoint's, else 256)")
    parser.add_argument("--num-classes", type=positive_int, default=None,
                        help="number of classes (default: the checkpoint's, else 1000)")
    parser.add_argument("--cfg-scale", type=guidance_scale, default=cfg_default,
                        help="classifier-free guidance scale, >= 1 (1: no guidance)")
    parser.add_argument("--num-sampling-steps", type=positive_int, default=250)
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                        help="TF32 matmuls on Ampere+ GPUs (the default): much faster, slightly different numbers; "
                             "--no-tf32 is --precision fp32")
    add_speed_arguments(parser, precision_default=None)  # None: tell an explicit --precision from --no-tf32's
    parser.add_argument("--ckpt", type=str, default=None,
                        help="a SiT checkpoint: local .pt, URL, hf://org/repo/file or a published name "
                             "(default: download the published SiT-XL/2 at --image-size 256, or 512)")
    parser.add_argument("--guide-all-channels", action="store_true",
                        help="guide all latent channels (the original guides only the first 3)")
    parser.add_argument("--cfg-interval", type=unit_interval_float, nargs=2, metavar=("LO", "HI"), default=(0.0, 1.0),
                        help="apply guidance only for t in [LO, HI] (t=0 noise, t=1 data); default 0 1")


def parse_sampling_args(
    argv: Optional[Sequence[str]],
    *,
    description: str,
    vae_default: str,
    cfg_default: float,
    add_script_arguments: Callable[[argparse.ArgumentParser], None],
    likelihood_hint: Optional[str] = None,
) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Parse `<mode> [options]`: the mode (ODE or SDE) comes first and picks its argument group.

    Returns the parser (for later `parser.error`) and the args, with `args.mode` set. Bad input
    exits with argparse's usage line and a one-line message (status 2). `likelihood_hint`: the
    message refusing --likelihood, for a script that does not evaluate it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # allow_abbrev=False: a misspelt or truncated flag is an error, never a silent match
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     epilog="The mode comes first; `<script> ODE -h` or `<script> SDE -h` "
                                            "lists the sampler's own options.")
    add_model_arguments(parser, vae_default=vae_default, cfg_default=cfg_default)
    add_script_arguments(parser)
    mode = argv[0] if argv else None
    if mode in SAMPLING_MODES:
        parse_transport_args(parser)
        # None / NOT_GIVEN: take the checkpoint's setting unless a flag is given (see resolve_transport_args)
        parser.set_defaults(path_type=None, prediction=None, loss_weight=NOT_GIVEN)
        if mode == "ODE":
            parse_ode_args(parser)
        else:
            parse_sde_args(parser)
            # accepted here only to refuse it with a clear message
            parser.add_argument("--likelihood", action="store_true", help=argparse.SUPPRESS)
    elif mode not in ("-h", "--help"):
        got = "nothing" if mode is None else repr(mode)
        parser.error(f"the first argument must be the sampling mode, ODE or SDE (got {got})")
    args = parser.parse_args(argv)
    if likelihood_hint and args.likelihood:
        parser.error(likelihood_hint)
    check_common_args(parser, args)
    return parser, args


def resolve_precision(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Set args.precision from --precision and the older --tf32/--no-tf32 (default tf32); contradictions are errors."""
    if args.tf32 is False:
        if args.precision not in (None, "fp32"):
            parser.error(f"--no-tf32 means --precision fp32, which contradicts --precision {args.precision}")
        args.precision = "fp32"
    elif args.tf32 is True and args.precision == "fp32":
        parser.error("--tf32 contradicts --precision fp32 (pass one of them)")
    args.precision = args.precision or "tf32"  # the original's: fp32 weights, TF32 matmuls on GPUs
    args.tf32 = args.precision != "fp32"


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that involve several flags."""
    resolve_precision(parser, args)
    # Known latent here: a VAE named by --vae, or no --vae and no --ckpt (the published models). With
    # --ckpt alone the checkpoint tells (download.load_model refuses the size for a latent checkpoint).
    known_latent = args.vae != PIXEL_SPACE and (args.vae is not None or args.ckpt is None)
    if args.image_size is not None and args.image_size % 8 and known_latent:
        parser.error(f"--image-size must be a multiple of 8 for latent models (the VAE downsamples by 8), got "
                     f"{args.image_size}; a pixel-space checkpoint takes any size")
    low, high = args.cfg_interval
    if low > high:
        parser.error(f"--cfg-interval LO HI needs LO <= HI, got {low} {high}")
    if args.num_sampling_steps < 2:
        parser.error(f"--num-sampling-steps must be at least 2, got {args.num_sampling_steps}")
    if args.likelihood and args.mode != "ODE":
        parser.error("--likelihood works in ODE mode only (it integrates the probability-flow ODE)")
    if args.likelihood and args.cfg_scale != 1.0:
        parser.error(f"--likelihood evaluates the unguided model: pass --cfg-scale 1 (got {args.cfg_scale}); "
                     f"a guided sampler has no likelihood")


#################################################################################
#                          Model, VAE and sampler setup                         #
#################################################################################

def load_model_from_args(args: argparse.Namespace, device: torch.device) -> tuple[SiT, dict]:
    """The SiT of --ckpt (or the published model), on `device` in eval mode, and its info.

    Fills args.model, args.image_size and args.num_classes from the checkpoint where not given,
    then the transport settings (resolve_transport_args). Exits with a one-line message when the
    checkpoint cannot be fetched or loaded, or contradicts the flags.
    """
    try:
        model, info = download.load_model(args.ckpt, model_name=args.model, image_size=args.image_size,
                                          num_classes=args.num_classes)
    except download.CheckpointError as error:
        raise SystemExit(f"error: {error}")
    args.model = args.model or info["model_name"] or "custom"
    args.image_size = info["image_size"]
    args.num_classes = info["num_classes"]
    resolve_transport_args(args, info.get("transport"))
    if args.cfg_scale > 1.0 and not has_null_class(model.config):
        raise SystemExit("error: this model was trained without label dropout, so it has no null class for "
                         "guidance: pass --cfg-scale 1")
    return speed_up_model(model.to(device).eval(), args), info


def resolve_transport_args(args: argparse.Namespace, checkpoint_transport: Optional[dict]) -> None:
    """Fill the transport flags from the checkpoint's training settings.

    path type, prediction and loss weight describe what the model was trained to output: a flag
    contradicting the checkpoint is an error. train/sample eps are integration choices: a flag wins.
    """
    stored = checkpoint_transport or {}
    for key in ("path_type", "prediction", "loss_weight"):
        given = getattr(args, key)
        is_given = given != NOT_GIVEN if key == "loss_weight" else given is not None
        # a loss weight of None is a real setting; path type and prediction are None when unknown
        is_stored = key in stored if key == "loss_weight" else stored.get(key) is not None
        if is_given and is_stored and given != stored[key]:
            flag = "--" + key.replace("_", "-")
            raise SystemExit(f"error: {flag} {given} but the checkpoint was trained with {flag} {stored[key]}")
        if not is_given:
            setattr(args, key, stored[key] if is_stored else TRANSPORT_DEFAULTS[key])
    for key in ("train_eps", "sample_eps"):
        if getattr(args, key) is None and stored.get(key) is not None:
            setattr(args, key, stored[key])


def vae_name_from_args(args: argparse.Namespace, info: dict, default: str) -> Optional[str]:
    """The VAE to decode with; None for a pixel-space model.

    --vae wins; else the checkpoint's VAE when it is a local folder that exists (a custom VAE the
    model was trained with); else the script's default (the original's: sample.py mse, sample_ddp.py
    ema; the two SD-VAEs share one encoder, so either decodes any SD-VAE latent).
    """
    pixel_space = info.get("vae") == PIXEL_SPACE or info.get("in_channels") == 3
    if pixel_space and args.vae not in (None, PIXEL_SPACE):
        raise SystemExit(f"error: --vae {args.vae} but the checkpoint is a pixel-space model (trained with "
                         f"--vae none, 3 channels): drop --vae")
    if pixel_space:
        return None
    if args.vae == PIXEL_SPACE:
        raise SystemExit(f"error: --vae none but the checkpoint's model works on {info.get('in_channels')}-channel "
                         f"VAE latents: pass --vae ema, mse or a VAE folder, or drop --vae")
    if args.vae is not None:
        return args.vae
    stored = info.get("vae")
    if isinstance(stored, str) and stored not in ("ema", "mse") and os.path.isdir(stored):
        return stored
    return default


def load_decoder(name: Optional[str], device: torch.device) -> Any:
    """load_vae(name) (exits with a one-line message on failure), or None for pixel-space models."""
    return None if name is None else load_vae(name, device)


def transport_sampler(args: argparse.Namespace) -> Sampler:
    try:
        return Sampler(transport_from_args(args))
    except ValueError as error:
        raise SystemExit(f"error: {error}")


def sample_fn_for_args(args: argparse.Namespace) -> Callable:
    """The ODE or SDE sampling function of the flags (the last state only, no trajectory)."""
    try:
        return sample_fn_from_args(transport_sampler(args), args.mode, args, keep_trajectory=False)
    except ValueError as error:
        raise SystemExit(f"error: {error}")


def likelihood_fn_for_args(args: argparse.Namespace) -> Callable:
    """The ODE log-likelihood function of the flags: fn(x, model, y=...) -> LikelihoodResult."""
    try:
        return transport_sampler(args).sample_ode_likelihood(
            sampling_method=args.sampling_method, num_steps=args.num_sampling_steps, atol=args.atol, rtol=args.rtol,
            num_probes=getattr(args, "num_probes", 1), exact_trace=getattr(args, "exact_trace", False))
    except ValueError as error:
        raise SystemExit(f"error: {error}")


def setup_torch(precision: str) -> None:
    """No gradients; matmul precision flags of a --precision choice (TF32 unless fp32)."""
    configure_precision(precision)
    torch.set_grad_enabled(False)


def speed_up_model(model: SiT, args: argparse.Namespace) -> SiT:
    """--compile: compile the model for inference (see train_utils.compile_for_sampling); the
    likelihood differentiates through the model, so it keeps the per-block compile of training."""
    if not args.compile:
        return model
    if getattr(args, "likelihood", False):
        return compile_model(model)
    return compile_for_sampling(model)


#################################################################################
#                          Sampling and decoding                                #
#################################################################################

def guided_sample(sample_fn: Callable, model: SiT, z: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                  guide_all_channels: bool = False, cfg_interval: tuple[float, float] = (0.0, 1.0),
                  always_guide: bool = False) -> torch.Tensor:
    """Run the sampler from noise z: (N, C, L, L) with labels y: (N,); returns the samples (N, C, L, L).

    With cfg_scale > 1 (the original sample_ddp.py's rule), or always with `always_guide` (the
    original sample.py's, even at cfg_scale 1): z is doubled, the second half gets the null label
    (num_classes), and model.forward_with_cfg combines the two halves. The doubled batch draws other
    SDE noise than the plain one, hence the two rules.
    """
    if cfg_scale > 1.0 or always_guide:
        null_labels = torch.full_like(y, model.num_classes)
        z_in = torch.cat([z, z], dim=0)            # (2N, C, L, L)
        y_in = torch.cat([y, null_labels], dim=0)  # (2N,)
        samples = sample_fn(z_in, model.forward_with_cfg, y=y_in, cfg_scale=cfg_scale,
                            guide_all_channels=guide_all_channels, cfg_interval=cfg_interval)[-1]
        samples, _ = samples.chunk(2, dim=0)       # drop the null-class half
        return samples
    return sample_fn(z, model.forward, y=y)[-1]


def generate_latents(sample_fn: Callable, model: SiT, z: torch.Tensor, y: torch.Tensor,
                     args: argparse.Namespace, always_guide: bool = False) -> torch.Tensor:
    """guided_sample with the command line's guidance settings, under its --precision autocast."""
    with autocast(args.precision, z.device):  # only the model's matmuls; the state stays fp32
        return guided_sample(sample_fn, model, z, y, args.cfg_scale, args.guide_all_channels, tuple(args.cfg_interval),
                             always_guide)


def decode_latents(vae: Any, latents: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Latents (N, 4, L, L) to float32 images (N, 3, 8L, 8L) in about [-1, 1]; identity for pixel
    models (vae None). precision: a --precision choice (bf16/fp16 autocast the decoder)."""
    if vae is None:
        return latents.clamp(-1, 1)  # pixels: the model's output, kept to the images' range
    with autocast(precision, latents.device):
        return vae.decode(latents / LATENT_SCALE).sample.float()


def encode_images(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] to scaled latents (N, 4, H/8, W/8): the posterior mean.

    The mean (not a sample) makes the likelihood of a data set deterministic.
    """
    if vae is None:
        return images
    return vae.encode(images).latent_dist.mean * LATENT_SCALE


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] to uint8 (N, H, W, 3), rounded as the original (127.5 x + 128)."""
    pixels = torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1)  # (N, H, W, 3)
    return pixels.to("cpu", dtype=torch.uint8).numpy()


def seed_for(global_seed: int, index: int, stream: str) -> int:
    """A 63-bit seed for one image index (or batch start) and one use ("image", "sde", "likelihood").

    Distinct (seed, index, stream) triples give unrelated generators, so the noise of image i never
    equals the SDE noise of a batch that starts at i.
    """
    state = np.random.SeedSequence([global_seed, index, SEED_STREAMS[stream]]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) >> 1)


def noise_and_labels(indices: Sequence[int], global_seed: int, latent_shape: tuple[int, int, int],
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's own noise (C, L, L) and label, from a CPU generator seeded by (global_seed, index).

    Returns z: (N, C, L, L) and y: (N,) int64 on the CPU; identical whatever the batch, process
    count or device.
    """
    noises, labels = [], []
    for index in indices:
        generator = torch.Generator().manual_seed(seed_for(global_seed, index, "image"))
        noises.append(torch.randn(latent_shape, generator=generator))
        labels.append(torch.randint(0, num_classes, (), generator=generator))
    return torch.stack(noises), torch.stack(labels)
