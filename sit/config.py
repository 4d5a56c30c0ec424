"""Typed configuration (transport, sampler families, guidance), and `resolve_settings`: the one rule for
settings that both a flag and a checkpoint can give (a contradicting flag is an error for what describes
the model, else a warning or silent; otherwise the flag, else the checkpoint's value, else the default)."""
from __future__ import annotations

import argparse
import dataclasses
import enum
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional

from sit.errors import UsageError
from transport import Sampler, Transport, create_transport
from train_utils import parse_ode_args, parse_sde_args
from transport.integrators import ADAPTIVE_METHODS, TOLERANCE_FREE_METHODS, is_adaptive
from transport.schedules import TimeSchedule


# Flag versus checkpoint resolution

def flag_name(destination: str) -> str:
    """A destination's flag: repa_depth -> --repa-depth."""
    return "--" + destination.replace("_", "-")


class Rule(enum.Enum):
    LOCKED = "locked"   # describes the model: a contradicting flag is an error
    WARN = "warn"       # the flag wins, with a warning that the run differs from the checkpoint's
    FREE = "free"       # the flag wins silently (e.g. an integration choice)


@dataclass(frozen=True)
class Setting:
    """How one setting resolves. `conflict`/`warning`: message templates with {flag}, {given}, {held} and
    {source}; `same` compares a flag's value with the checkpoint's; `incompatible`: values that are an
    error (the `conflict` message) even where the rule allows another value."""
    rule: Rule = Rule.LOCKED
    default: Any = None
    conflict: str = "{flag} {given} but {source} was trained with {flag} {held}"
    warning: str = "{flag} {given} replaces the value {held} of {source}"
    same: Callable[[Any, Any], bool] = operator.eq
    incompatible: Callable[[Any, Any], bool] = lambda given, held: False


# The common rules of settings a checkpoint gives (messages: the templates' words, plus {step} for RUN_CHANGE)
LOCKED_HINT = "; drop the flag (model and transport settings come from the checkpoint) or start a new experiment"
LOCKED = Setting(Rule.LOCKED, conflict=Setting.conflict + LOCKED_HINT)
RUN_CHANGE = Setting(Rule.WARN, warning="{flag} {given} replaces the checkpoint's {held} from step {step} on: the run "
                                        "will differ from an uninterrupted one")
FREE = Setting(Rule.FREE)


@dataclass
class Resolved:
    """The resolved values, where each came from ("flag", "checkpoint" or "default"), and the warnings."""
    values: dict[str, Any]
    origin: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    def describe(self, key: str) -> str:
        """Where a value came from: `--num-classes 2`, `the checkpoint's num_classes 2`, `(the default)`."""
        if self.origin[key] == "checkpoint":
            return f"the checkpoint's {key} {self.values[key]}"
        default = " (the default)" if self.origin[key] == "default" else ""
        return f"{flag_name(key)} {self.values[key]}{default}"


def resolve_settings(settings: Mapping[str, Setting], given: Mapping[str, Any], stored: Optional[Mapping[str, Any]],
                     source: str = "the checkpoint") -> Resolved:
    """Resolve each setting from the explicit flags `given` (sit.cli.parse_with_explicit), the checkpoint's
    `stored` values (None: no checkpoint; a missing key: unknown) and the defaults. UsageError on a refused
    conflict."""
    stored = stored or {}
    values, origin, warnings = {}, {}, []
    for key, setting in settings.items():
        if key in given:
            values[key], origin[key] = given[key], "flag"
            if key in stored and not setting.same(given[key], stored[key]):
                words = dict(flag=flag_name(key), given=given[key], source=source, held=stored[key])
                if setting.rule == Rule.LOCKED or setting.incompatible(given[key], stored[key]):
                    raise UsageError(setting.conflict.format(**words))
                if setting.rule == Rule.WARN:
                    warnings.append(setting.warning.format(**words))
        elif key in stored:
            values[key], origin[key] = stored[key], "checkpoint"
        else:
            values[key], origin[key] = setting.default, "default"
    return Resolved(values, origin, warnings)


# Transport and samplers

@dataclass(frozen=True)
class TransportConfig:
    """What the model learns: the original's create_transport arguments."""
    path_type: str = "Linear"
    prediction: str = "velocity"
    loss_weight: Optional[str] = None
    train_eps: Optional[float] = None
    sample_eps: Optional[float] = None

    def build(self, time_schedule: Optional[TimeSchedule] = None) -> Transport:
        """The Transport (time_schedule: how training draws t; None: uniform); UsageError naming the flags."""
        try:
            # a checkpoint of an older run may hold a loss weight of a velocity model: never applied
            return create_transport(self.path_type, self.prediction, self.applied_loss_weight, self.train_eps,
                                    self.sample_eps, time_schedule=time_schedule)
        except ValueError as error:  # create_transport names its arguments; the scripts' user gave flags
            raise UsageError(re.sub(r"\b(train|sample)_eps\b", r"--\1-eps", str(error))) from None

    @property
    def applied_loss_weight(self) -> Optional[str]:
        """The loss weight training applies: None for a velocity model (the original never weights it)."""
        return None if self.prediction == "velocity" else self.loss_weight


# The transport settings: what the model was trained to output is locked to the checkpoint; the
# eps values are integration choices, where a flag wins.
TRANSPORT_SETTINGS = {
    "path_type": Setting(Rule.LOCKED, "Linear"),
    "prediction": Setting(Rule.LOCKED, "velocity"),
    "loss_weight": Setting(Rule.LOCKED, None),
    "train_eps": Setting(Rule.FREE, None),
    "sample_eps": Setting(Rule.FREE, None),
}


FLAG_OF_FIELD = {"num_steps": "num_sampling_steps"}  # a sampler field's flag destination where the names differ
COMMON_FIELDS = ("sampling_method", "num_steps", "time_shift")  # every family's; the record and folder name them apart


class SamplerFamily:
    """A sampler family of the sampling scripts: a frozen dataclass of its settings (with `sampling_method`,
    `num_steps`, `time_shift`), registered by its `mode` in SAMPLER_FAMILIES (docs/ARCHITECTURE.md). title:
    the mode in help; supports_likelihood: it has likelihood_fn; average_velocity: it samples MeanFlow
    models, and only those; min_steps: the fewest --num-sampling-steps it takes."""
    mode: ClassVar[str]
    title: ClassVar[str]
    add_flags: ClassVar[Callable[[argparse.ArgumentParser], None]]
    supports_likelihood: ClassVar[bool] = False
    average_velocity: ClassVar[bool] = False
    min_steps: ClassVar[int] = 2

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "SamplerFamily":
        """The settings of parsed flags (vars(args)): each field from its flag (FLAG_OF_FIELD), if given."""
        destinations = {item.name: FLAG_OF_FIELD.get(item.name, item.name) for item in dataclasses.fields(cls)}
        return cls(**{name: flags[flag] for name, flag in destinations.items() if flag in flags})

    def sample_fn(self, sampler: Sampler, keep_trajectory: bool = False) -> Callable:
        """The sampling function fn(x, model, **kwargs) (a transport.SampleFunction: it counts `nfe`)."""
        raise NotImplementedError(f"the sampler family {type(self).__name__} defines no sample_fn")

    def describe(self) -> str:
        """The sampler in words, for the log."""
        raise NotImplementedError(f"the sampler family {type(self).__name__} defines no describe")

    def evaluations(self, nfe: int) -> str:
        """The model evaluations a run made, e.g. `Euler, 250 steps: 250 model evaluations`."""
        return f"{self.sampling_method}, {self.num_steps} steps: {nfe} model evaluations"

    def own_settings(self) -> dict[str, Any]:
        """The family's own fields (all but COMMON_FIELDS), by name."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key not in COMMON_FIELDS}

    def folder_parts(self) -> list[str]:
        """Its part of sample_ddp.py's folder name after the common ones: `<field>-<value>` of its own fields."""
        return [f"{key}-{value}" for key, value in self.own_settings().items()]

    def record_settings(self) -> dict[str, Any]:
        """Its fields in the record's sampler_settings: its own, and time_shift when given."""
        shift = {} if self.time_shift is None else {"time_shift": self.time_shift}
        return {**self.own_settings(), **shift}

    def unused_flags(self, given: frozenset[str], likelihood: bool) -> list[str]:
        """One line per flag of the family given that this run will not read."""
        return []


@dataclass(frozen=True)
class ODEConfig(SamplerFamily):
    """The probability-flow ODE sampler (the original's ODE flags)."""
    sampling_method: str = "dopri5"
    num_steps: int = 250
    atol: float = 1e-6
    rtol: float = 1e-3
    reverse: bool = False
    time_shift: Optional[float] = None  # --time-shift: shifted fixed-step grid (transport.schedules); None: uniform

    mode = "ODE"
    title = "ODE (probability flow)"
    add_flags = staticmethod(parse_ode_args)
    supports_likelihood = True

    def describe(self) -> str:
        """E.g. `ODE dopri5 (adaptive steps, atol 1e-06, rtol 0.001)`, `ODE euler, 50 steps`."""
        if is_adaptive(self.sampling_method):
            return f"ODE {self.sampling_method} (adaptive steps, atol {self.atol:g}, rtol {self.rtol:g})"
        shift = f" (time shift {self.time_shift:g})" if self.time_shift is not None else ""
        return f"ODE {self.sampling_method}, {self.num_steps} steps{shift}"

    def evaluations(self, nfe: int) -> str:
        if is_adaptive(self.sampling_method):
            return f"{self.sampling_method}: adaptive, {nfe} model evaluations"
        return super().evaluations(nfe)

    def folder_parts(self) -> list[str]:
        return [f"atol-{self.atol}", f"rtol-{self.rtol}"] + (["reverse"] if self.reverse else [])

    def unused_flags(self, given: frozenset[str], likelihood: bool) -> list[str]:
        method, warnings = self.sampling_method, []
        if method in TOLERANCE_FREE_METHODS:
            warnings += [f"--{flag} is not used: --sampling-method {method} takes fixed steps (--num-sampling-steps); "
                         f"tolerances apply to adaptive solvers such as dopri5" for flag in ("atol", "rtol")
                         if flag in given]
        if method in ADAPTIVE_METHODS and "num_sampling_steps" in given:
            warnings.append(f"--num-sampling-steps {self.num_steps} does not change what {method} computes: an "
                            f"adaptive solver chooses its own steps by --atol and --rtol")
        if self.reverse:
            warnings.append("--reverse is not used: --likelihood always integrates from the data to noise" if likelihood
                            else "--reverse integrates from data (t=1) back to noise (t=0): started from noise, as "
                                 "here, it does not sample the model's images")
        return warnings

    def sample_fn(self, sampler: Sampler, keep_trajectory: bool = False) -> Callable:
        return sampler.sample_ode(sampling_method=self.sampling_method, num_steps=self.num_steps, atol=self.atol,
                                  rtol=self.rtol, reverse=self.reverse, keep_trajectory=keep_trajectory,
                                  time_shift=self.time_shift)

    def likelihood_fn(self, sampler: Sampler, num_probes: int = 1, exact_trace: bool = False) -> Callable:
        """fn(x, model, **kwargs) -> LikelihoodResult, integrating the ODE from the data to the prior."""
        if self.time_shift is not None:
            raise UsageError("--time-shift places the steps of sampling; the likelihood integration does not take it")
        return sampler.sample_ode_likelihood(sampling_method=self.sampling_method, num_steps=self.num_steps,
                                             atol=self.atol, rtol=self.rtol, num_probes=num_probes,
                                             exact_trace=exact_trace)


@dataclass(frozen=True)
class SDEConfig(SamplerFamily):
    """The reverse SDE sampler (the original's SDE flags)."""
    sampling_method: str = "Euler"
    num_steps: int = 250
    diffusion_form: str = "sigma"
    diffusion_norm: float = 1.0
    last_step: Optional[str] = "Mean"
    last_step_size: float = 0.04
    time_shift: Optional[float] = None  # --time-shift: shifted step grid (transport.schedules); None: uniform

    mode = "SDE"
    title = "SDE"
    add_flags = staticmethod(parse_sde_args)

    def describe(self) -> str:
        """E.g. `SDE Euler, 250 steps (diffusion sigma x1, last step Mean)`."""
        shift = f", time shift {self.time_shift:g}" if self.time_shift is not None else ""
        return (f"SDE {self.sampling_method}, {self.num_steps} steps (diffusion {self.diffusion_form} "
                f"x{self.diffusion_norm:g}, last step {self.last_step}{shift})")

    def folder_parts(self) -> list[str]:
        return [self.diffusion_form, f"norm-{self.diffusion_norm}", f"last-{self.last_step}",
                f"lastsize-{self.last_step_size}"]

    def unused_flags(self, given: frozenset[str], likelihood: bool) -> list[str]:
        if self.last_step is None and "last_step_size" in given:
            return ["--last-step-size is not used: --last-step None takes no last step"]
        return []

    def sample_fn(self, sampler: Sampler, keep_trajectory: bool = False) -> Callable:
        return sampler.sample_sde(sampling_method=self.sampling_method, diffusion_form=self.diffusion_form,
                                  diffusion_norm=self.diffusion_norm, last_step=self.last_step,
                                  last_step_size=self.last_step_size, num_steps=self.num_steps,
                                  keep_trajectory=keep_trajectory, time_shift=self.time_shift)


def build_sample_fn(transport: TransportConfig, sampler: SamplerFamily, keep_trajectory: bool = False) -> Callable:
    """The sampling function fn(x, model, **kwargs) of a transport and sampler; UsageError when they do not fit."""
    try:
        return sampler.sample_fn(Sampler(transport.build()), keep_trajectory)
    except ValueError as error:
        raise UsageError(str(error)) from None


@dataclass(frozen=True)
class GuidanceConfig:
    """Classifier-free guidance: scale (1: none), which channels, the interval of t where it applies, and
    guide_ckpt: autoguidance by that checkpoint's model instead of the null label (sit.guidance)."""
    scale: float = 1.0
    all_channels: bool = False
    interval: tuple[float, float] = (0.0, 1.0)
    guide_ckpt: Optional[str] = None
