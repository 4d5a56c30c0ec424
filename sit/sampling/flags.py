"""The sampling scripts' command line, declared once: the shared flags, sample_ddp.py's likelihood flags, and
the mode first, which picks its family's flag group. `sit.sampling.settings` checks the parsed flags."""
from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence

from models import SiT_models
from sit.cli import ScriptParser, add_speed_arguments, guidance_scale, positive_float, positive_int, unit_interval_float
from sit.dequantize import DEQUANTIZATIONS
from sit.errors import UsageError
from sit.sampling.families import SAMPLER_FAMILIES, mode_names
from train_utils import parse_transport_args

HELP_FLAGS = ("-h", "--help")


def sampling_mode(argv: Sequence[str]) -> Optional[str]:
    """The mode that argv starts with (a key of SAMPLER_FAMILIES), or None for a help request; UsageError otherwise."""
    mode = argv[0] if argv else None
    if mode in SAMPLER_FAMILIES:
        return mode
    if mode in HELP_FLAGS:
        return None
    got = "nothing" if mode is None else repr(mode)
    raise UsageError(f"the first argument must be the sampling mode, {mode_names()} (got {got})")


def add_model_arguments(parser: argparse.ArgumentParser, *, vae_default: str, cfg_default: float) -> None:
    """The flags both scripts share (the original's, plus the guidance options)."""
    parser.add_argument("mode", choices=SAMPLER_FAMILIES, help=f"sampler: "
                        f"{' or '.join(family.title for family in SAMPLER_FAMILIES.values())}; must come first")
    parser.add_argument("--model", type=str, choices=list(SiT_models), default=None,
                        help="model size (default: the checkpoint's, else SiT-XL/2)")
    parser.add_argument("--vae", type=str, default=None,
                        help=f"ema, mse, another latent space of sit.latents or a local diffusers AutoencoderKL "
                             f"folder (default: the checkpoint's local VAE folder or latent space of another "
                             f"kind, else {vae_default}); pixel-space "
                             f"checkpoints (trained with --vae none) need none")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="image size, a multiple of the VAE's downsampling (SD-VAE: 8) unless --vae none "
                             "(default: the checkpoint's, else 256)")
    parser.add_argument("--num-classes", type=positive_int, default=None,
                        help="number of classes (default: the checkpoint's, else 1000)")
    parser.add_argument("--cfg-scale", type=guidance_scale, default=cfg_default,
                        help="classifier-free guidance scale, >= 1 (1: no guidance)")
    parser.add_argument("--num-sampling-steps", type=positive_int, default=250,
                        help="steps of fixed-step samplers (adaptive ODE solvers choose their own)")
    parser.add_argument("--time-shift", type=positive_float, default=None,
                        help="fixed-step samplers: place the steps by t -> t / (t + S (1 - t)) (S > 1: more steps "
                             "near noise; SD3/LightningDiT's shift); adaptive solvers refuse it")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                        help="TF32 matmuls on Ampere+ GPUs (the default): much faster, slightly different numbers; "
                             "--no-tf32 is --precision fp32")
    add_speed_arguments(parser, precision_default=None)  # None: tell an explicit --precision from --no-tf32's
    parser.add_argument("--ckpt", type=str, default=None,
                        help="a SiT checkpoint: local .pt, URL, hf://org/repo/file or a published name "
                             "(default: download the published SiT-XL/2 at --image-size 256, or 512); "
                             "a train.py experiment folder takes its newest checkpoint, a results folder "
                             "(e.g. results) its newest experiment's")
    parser.add_argument("--guide-all-channels", action="store_true",
                        help="guide all latent channels (the original guides only the first 3)")
    parser.add_argument("--cfg-interval", type=unit_interval_float, nargs=2, metavar=("LO", "HI"), default=(0.0, 1.0),
                        help="apply guidance only for t in [LO, HI] (t=0 noise, t=1 data); default 0 1")
    parser.add_argument("--guide-ckpt", type=str, default=None,
                        help="autoguidance: guide with this checkpoint's model (smaller or trained for less; same "
                             "classes, latent size and transport) instead of the null label, all channels, at "
                             "--cfg-scale and --cfg-interval; its settings come from its checkpoint")


def add_likelihood_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of --likelihood (sample_ddp.py)."""
    parser.add_argument("--data-path", type=str, default=None,
                        help="with --likelihood: an ImageFolder of real images to evaluate "
                             "(default: evaluate freshly generated samples)")
    parser.add_argument("--dequantize", choices=DEQUANTIZATIONS, default=None,
                        help="with --likelihood of a pixel-space model: noise added to the 8-bit images "
                             "(default uniform; none: density at the bin centres, no bound)")
    parser.add_argument("--num-probes", type=positive_int, default=1,
                        help="with --likelihood: Hutchinson probes averaged per divergence (default 1)")
    parser.add_argument("--exact-trace", action="store_true",
                        help="with --likelihood: the exact divergence, one backward pass per dimension (small images)")


def sampling_parser(mode: Optional[str], *, description: str, vae_default: str, cfg_default: float,
                    add_script_arguments: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """The parser of `<mode> [options]`: the shared flags, the script's own, then the mode's family's group
    (mode None, a help request before any mode: the shared flags only)."""
    # allow_abbrev=False: a misspelt or truncated flag is an error, never a silent match
    parser = ScriptParser(description=description, allow_abbrev=False,
                          epilog=f"The mode comes first; {' or '.join(f'`<script> {name} -h`' for name in SAMPLER_FAMILIES)} "
                                 f"lists the sampler's own options.")
    add_model_arguments(parser, vae_default=vae_default, cfg_default=cfg_default)
    add_script_arguments(parser)
    if mode is not None:
        parse_transport_args(parser)
        family = SAMPLER_FAMILIES[mode]
        family.add_flags(parser)
        if not family.supports_likelihood:  # accepted only to refuse it with a clear message
            parser.add_argument("--likelihood", action="store_true", help=argparse.SUPPRESS)
    return parser
