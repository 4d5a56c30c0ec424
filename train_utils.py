"""The original's command-line groups for the transport and the samplers, with the same flags and defaults
(choices from the tables `transport` dispatches on); `sit.config` turns the values into typed settings."""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

from transport import DIFFUSION_FORMS, LAST_STEPS, LOSS_WEIGHTS, ODE_METHODS, PATH_TYPES, PREDICTIONS, SDE_METHODS


def none_or_str(value: str) -> Optional[str]:
    """argparse type: the string 'None' means None."""
    return None if value == "None" else value


def checked_number(convert: Callable[[str], float], accepts: Callable[[float], bool], requirement: str,
                   name: str) -> Callable[[str], float]:
    """An argparse type: `convert(value)`, refused with "must be <requirement>, got <value>" unless `accepts` it."""
    def parse(value: str) -> float:
        number = convert(value)
        if not accepts(number):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return number

    parse.__name__ = name  # argparse names the type in its own messages
    return parse


positive_float = checked_number(float, lambda x: math.isfinite(x) and x > 0, "a positive number", "positive_float")
non_negative_float = checked_number(float, lambda x: math.isfinite(x) and x >= 0, ">= 0", "non_negative_float")


def parse_transport_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Transport arguments")
    group.add_argument("--path-type", type=str, default="Linear", choices=list(PATH_TYPES),
                       help="the interpolant between noise and data")
    group.add_argument("--prediction", type=str, default="velocity", choices=list(PREDICTIONS),
                       help="what the model outputs")
    group.add_argument("--loss-weight", type=none_or_str, default=None, choices=list(LOSS_WEIGHTS),
                       help="weighting of score and noise losses over time (default: none)")
    group.add_argument("--sample-eps", type=float, default=None,
                       help="distance from the interval's ends when sampling (default: by path and prediction)")
    group.add_argument("--train-eps", type=float, default=None,
                       help="distance from the interval's ends when training (default: by path and prediction)")


def parse_ode_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ODE arguments")
    group.add_argument("--sampling-method", type=str, default="dopri5", choices=list(ODE_METHODS),
                       help="ODE solver (torchdiffeq); adaptive ones choose their own number of model calls")
    group.add_argument("--atol", type=positive_float, default=1e-6, help="Absolute tolerance")
    group.add_argument("--rtol", type=positive_float, default=1e-3, help="Relative tolerance")
    group.add_argument("--reverse", action="store_true", help="integrate from data to noise")
    group.add_argument("--likelihood", action="store_true", help="evaluate log-likelihoods (sample_ddp.py)")


def parse_sde_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SDE arguments")
    group.add_argument("--sampling-method", type=str, default="Euler", choices=list(SDE_METHODS),
                       help="SDE integrator (Euler-Maruyama or Heun)")
    group.add_argument("--diffusion-form", type=str, default="sigma", choices=list(DIFFUSION_FORMS),
                       help="form of diffusion coefficient in the SDE")
    group.add_argument("--diffusion-norm", type=non_negative_float, default=1.0,
                       help="magnitude of the diffusion coefficient (>= 0)")
    group.add_argument("--last-step", type=none_or_str, default="Mean", choices=list(LAST_STEPS),
                       help="form of last step taken in the SDE")
    group.add_argument("--last-step-size", type=positive_float, default=0.04, help="size of the last step taken")
