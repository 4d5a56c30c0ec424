"""Published evaluations as presets of sample_ddp.py's flags (`--preset NAME`, `--preset list`;
docs/evaluation.md): a flag not given takes the preset's value, one given otherwise wins with a warning."""
from __future__ import annotations

import argparse
import contextlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from sit.cli import ScriptParser, parse_with_explicit
from sit.errors import UsageError
from sit.sampling.families import SAMPLER_FAMILIES
from sit.sampling.flags import HELP_FLAGS

PRESET_FLAG = "--preset"
LIST_PRESETS = "list"


@dataclass(frozen=True)
class Preset:
    """One published evaluation: its mode and flags (as typed on a command line), result and sources."""
    name: str
    mode: str  # a SAMPLER_FAMILIES mode: ODE, SDE or MeanFlow
    flags: tuple[tuple[str, tuple[str, ...]], ...]  # (flag, its values); () for a switch such as --guide-all-channels
    published: str  # the published result, e.g. "FID 2.06, IS 270.3"
    source: str  # where the settings and the number come from
    note: str = ""  # what could not be verified, or how the settings were mapped onto this code's flags
    label_sampling: str = "random"  # the labels of the published number's images (sample_ddp.py --label-sampling)
    labels_source: str = "the original sample_ddp.py draws each image's class with torch.randint"

    def argv(self) -> list[str]:
        """The preset as a command line: the mode, then its flags."""
        return [self.mode] + [token for flag, values in self.flags for token in (flag, *values)]


# The settings of SiT's original evaluation that every preset below shares: the published XL/2 at 256,
# 50K images (FID-50K), decoded with sd-vae-ft-ema (the original sample_ddp.py's VAE).
SIT_XL_256 = (("--model", ("SiT-XL/2",)), ("--image-size", ("256",)), ("--vae", ("ema",)),
              ("--num-fid-samples", ("50000",)))
# The original SDE sampler's defaults, written out: Euler-Maruyama on 250 points from t=0 to 0.96, w(t) = sigma_t,
# then one noiseless (Mean) step of 0.04 to the data.
SIT_SDE_250 = (("--sampling-method", ("Euler",)), ("--num-sampling-steps", ("250",)), ("--diffusion-form", ("sigma",)),
               ("--diffusion-norm", ("1.0",)), ("--last-step", ("Mean",)), ("--last-step-size", ("0.04",)))

PRESETS: dict[str, Preset] = {preset.name: preset for preset in (
    Preset("sit-xl2-256-ode-cfg1.5", "ODE",
           SIT_XL_256 + (("--sampling-method", ("heun2",)), ("--num-sampling-steps", ("125",)),
                         ("--cfg-scale", ("1.5",))),
           published="FID-50K 2.06, IS 270.3 (SiT-XL/2, ImageNet 256, GPU; 2.15 when sampled on TPU)",
           source="settings: the authors' answer in willisma/SiT issue #18 (second-order Heun ODE, 125 steps, "
                  "cfg scale 1.5); numbers: the willisma/SiT README's model table (FID-50K 2.06, IS 270.27)",
           note="guides the first 3 latent channels, as the original; the authors count 250 model evaluations, "
                "a 125-point heun2 grid here (and in the original PyTorch code) makes 248 (the record's nfe)"),
    Preset("sit-xl2-256-sde", "SDE", SIT_XL_256 + SIT_SDE_250 + (("--cfg-scale", ("1.0",)),),
           published="FID-50K 8.3 without guidance (SiT-XL/2 at 7M iterations, the published checkpoint)",
           source="the REPA paper (Yu et al. 2024, arXiv:2410.06940), Table 3: vanilla SiT-XL/2, 7M iterations, "
                  "250-step SDE sampler, no guidance",
           note="not verified against the SiT paper's own table (not readable here; another paper lists 8.61); "
                "diffusion form, last step and VAE are the original's defaults, assumed for this number"),
    Preset("repa-xl2-256-sde-cfg1.8-interval", "SDE",
           SIT_XL_256 + SIT_SDE_250 + (("--cfg-scale", ("1.8",)), ("--guide-all-channels", ()),
                                       ("--cfg-interval", ("0.3", "1.0"))),
           published="FID-50K 1.42 (SiT-XL/2 + REPA, 4M iterations, guidance interval)",
           source="sihyun-yu/REPA README (FID=1.42; evaluation: generate.py --mode=sde --num_steps=250 "
                  "--cfg-scale=1.8 --guidance_high=0.7) and its samplers.py (euler_maruyama_sampler)",
           labels_source="REPA's generate.py draws each image's class with torch.randint",
           note="mapped onto this code's flags: REPA's time runs from noise (1) to data (0), so guidance for its "
                "t in [0, 0.7] is --cfg-interval 0.3 1.0 here; its diffusion 2t is w(t) = sigma_t (--diffusion-form "
                "sigma) on the Linear path; it guides all 4 latent channels; same 250-point grid to 0.04 and "
                "noiseless last step (REPA keeps the state in float64, this code in float32). REPA's own "
                "checkpoint does not load here (another model class): use it for SiT-XL/2 models trained with REPA"),
    Preset("sit-xl2-512-ode-cfg1.5", "ODE",
           (("--model", ("SiT-XL/2",)), ("--image-size", ("512",)), ("--vae", ("ema",)),
            ("--num-fid-samples", ("50000",)), ("--sampling-method", ("heun2",)), ("--num-sampling-steps", ("125",)),
            ("--cfg-scale", ("1.5",))),
           published="FID-50K 2.62, IS 252.21 (SiT-XL/2, ImageNet 512)",
           source="numbers: the willisma/SiT README's model table (its 512x512 row); checkpoint: SiT-XL-2-512.pt of "
                  "the authors' hub collection (willisma/SiT issue #42), what --model SiT-XL/2 --image-size 512 "
                  "loads without --ckpt",
           note="the sampler of the 512 number is not published: the settings the authors gave for their XL/2 "
                "number (issue #18: Heun ODE, 125 steps, cfg scale 1.5, the first 3 latent channels guided) are "
                "assumed; not verified here (no network, no GPU)"),
    *(Preset(f"meanflow-xl2-256-{steps}step", "MeanFlow",
             SIT_XL_256 + (("--sampling-method", ("meanflow",)), ("--num-sampling-steps", (str(steps),)),
                           ("--cfg-scale", ("1.0",))),
             published=f"FID-50K {fid} with {steps} model evaluation{'s' if steps > 1 else ''} (MeanFlow-XL/2, "
                       f"ImageNet 256, 240 epochs)",
             source="Geng et al. 2025, \"Mean Flows for One-step Generative Modeling\", its "
                    "ImageNet 256 table (1-NFE 3.43, 2-NFE 2.20)",
             labels_source="not stated by the paper; random labels assumed",
             note="for a MeanFlow SiT-XL/2 trained here (train.py --objective meanflow, configs/meanflow-b-2.yaml at "
                  "XL/2 with the paper's omega/kappa): guidance is folded into training, so the sampler's cfg scale "
                  "is 1; the authors' released weights (JAX) do not load here")
      for steps, fid in ((1, "3.43"), (2, "2.20"))),
)}


@dataclass(frozen=True)
class PresetUse:
    """A preset merged into parsed flags: the merged flags and what was filled and overridden."""
    name: str
    flags: dict[str, Any]  # the parsed flags (destination -> value) with the preset's filled in
    given: frozenset[str]  # destinations given explicitly or filled by the preset
    filled: tuple[str, ...]  # e.g. ("--cfg-scale 1.5", "--guide-all-channels")
    overridden: tuple[str, ...]  # e.g. ("--cfg-scale 4.0 (the preset's: --cfg-scale 1.5)",)

    def summary(self) -> str:
        """One log line: the preset's name and the flags it filled."""
        filled = " ".join(self.filled) if self.filled else "nothing (every flag it sets was given)"
        return f"Preset {self.name} filled: {filled} [published: {PRESETS[self.name].published}]"

    def warnings(self) -> list[str]:
        """One line per explicit flag that overrides the preset, and one for labels chosen otherwise than
        the published number's."""
        lines = [f"--preset {self.name}: explicit {text} overrides the preset" for text in self.overridden]
        published, chosen = PRESETS[self.name].label_sampling, self.flags.get("label_sampling", "random")
        if chosen != published:
            lines.append(f"--preset {self.name}: its published number was measured with {published} labels; "
                         f"--label-sampling {chosen} is another protocol, its FID not directly comparable")
        return lines

    @contextlib.contextmanager
    def blamed(self) -> Iterator[None]:
        """A UsageError inside the block that names a flag the preset filled says so: the user did not type it."""
        try:
            yield
        except UsageError as error:
            text = str(error)
            flags = [filled.split()[0] for filled in self.filled]
            named = [flag for flag in flags if re.search(re.escape(flag) + r"(?![\w-])", text)]
            if not named:
                raise
            raise type(error)(f"{text} ({' '.join(named)}: filled by --preset {self.name}, not typed; give "
                              f"{'it' if len(named) == 1 else 'them'} explicitly to override)") from None


def preset_names() -> list[str]:
    """The names --preset accepts: every preset, and `list`."""
    return [*PRESETS, LIST_PRESETS]


def requested_preset(argv: Sequence[str]) -> Optional[str]:
    """The name after --preset in argv (None without one); UsageError (one line) for a name that does not exist."""
    finder = ScriptParser(add_help=False, allow_abbrev=False)
    finder.add_argument(PRESET_FLAG, default=None)
    # a pre-scan for --preset alone (the presets fill defaults); the full parse_args then rejects unknown flags
    name = finder.parse_known_args(list(argv))[0].preset
    if name is not None and name not in preset_names():
        raise UsageError(f"--preset {name!r} does not exist; choose one of {', '.join(preset_names())}")
    return name


def with_preset_mode(argv: Sequence[str], name: Optional[str]) -> list[str]:
    """argv with the preset's mode first when no mode was given; UsageError when the mode given is another."""
    argv = list(argv)
    if name is None or name == LIST_PRESETS or (argv and argv[0] in HELP_FLAGS):
        return argv
    mode = PRESETS[name].mode
    if argv and argv[0] in SAMPLER_FAMILIES:
        if argv[0] != mode:
            raise UsageError(f"--preset {name} is an {mode} evaluation but the mode given is {argv[0]}: "
                             f"run `{mode} --preset {name}` (or leave the mode out; the preset sets it)")
        return argv
    return [mode, *argv]


def apply_preset(name: str, flags: Mapping[str, Any], given: frozenset[str],
                 build_parser: Callable[[], argparse.ArgumentParser]) -> PresetUse:
    """A copy of parsed flags (e.g. vars(args)) with preset `name` merged in, explicit flags (`given`)
    winning; build_parser: the script's parser for the preset's mode, which parses the preset's own flags."""
    preset = PRESETS[name]
    values, _ = parse_with_explicit(build_parser, preset.argv())
    merged, filled, overridden, filled_dests = dict(flags), [], [], set()
    for flag, raw in preset.flags:
        dest = flag[2:].replace("-", "_")
        text = " ".join((flag, *raw))
        if dest not in given:
            merged[dest] = getattr(values, dest)
            filled.append(text)
            filled_dests.add(dest)
        elif flags[dest] != getattr(values, dest):
            typed = " ".join(map(str, flags[dest])) if isinstance(flags[dest], (list, tuple)) else flags[dest]
            mine = flag if flags[dest] is True else f"{flag} {typed}"
            overridden.append(f"{mine} (the preset's: {text})")
    return PresetUse(name, merged, given | frozenset(filled_dests), tuple(filled), tuple(overridden))


def preset_table() -> str:
    """What `--preset list` prints: each preset's mode, flags, published result, source and notes."""
    lines = []
    for preset in PRESETS.values():
        lines += [f"{preset.name}  ({preset.mode})",
                  f"    flags:     {' '.join(preset.argv())}",
                  f"    published: {preset.published}",
                  f"    source:    {preset.source}",
                  f"    labels:    {preset.label_sampling} ({preset.labels_source}; --label-sampling "
                  f"{preset.label_sampling})"]
        if preset.note:
            lines.append(f"    note:      {preset.note}")
    return "\n".join(lines)
