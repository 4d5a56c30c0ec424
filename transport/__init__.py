"""Stochastic interpolants: paths, training losses, ODE/SDE samplers and likelihood."""
from __future__ import annotations

from typing import Optional, Union

from .arguments import check_real
from .integrators import ODE_METHODS, SDE_METHODS
from .path import DIFFUSION_FORMS
from .schedules import TIME_SAMPLINGS, TimeSchedule, shift_time
from .transport import (DEFAULT_SAMPLE_EPS, LAST_STEPS, LikelihoodResult, ModelType, PathType, Sampler,
                        SampleFunction, Transport, WeightType)

# One table per choice drives both the command line's `choices` and the conversion to enums.
PATH_TYPES = {"Linear": PathType.LINEAR, "GVP": PathType.GVP, "VP": PathType.VP}
PREDICTIONS = {"velocity": ModelType.VELOCITY, "score": ModelType.SCORE, "noise": ModelType.NOISE}
LOSS_WEIGHTS = {None: WeightType.NONE, "velocity": WeightType.VELOCITY, "likelihood": WeightType.LIKELIHOOD}


def _lookup(table: dict, value, what: str, argument: str):
    """The enum member a name (or the member itself) of table stands for; TypeError/ValueError naming argument."""
    enum_type = type(next(iter(table.values())))
    if isinstance(value, enum_type):
        return value
    if not isinstance(value, str) and not (value is None and None in table):
        raise TypeError(f"{argument} must be one of {', '.join(repr(name) for name in table)} (or a "
                        f"{enum_type.__name__}), got {type(value).__name__} {value!r}")
    value = None if value == "None" and None in table else value
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, table))}")
    return table[value]


def default_eps(path_type: PathType, model_type: ModelType) -> tuple[float, float]:
    """The original's (train_eps, sample_eps) defaults: how far from the singular ends t=0, t=1 to stay."""
    if path_type == PathType.VP:
        return 1e-5, 1e-3
    if model_type != ModelType.VELOCITY:
        return 1e-3, 1e-3
    return 0.0, 0.0  # velocity on Linear and GVP is stable on the whole interval


def create_transport(
    path_type: Union[str, PathType] = "Linear",
    prediction: Union[str, ModelType] = "velocity",
    loss_weight: Optional[Union[str, WeightType]] = None,
    train_eps: Optional[float] = None,
    sample_eps: Optional[float] = None,
    *,
    time_schedule: Optional[TimeSchedule] = None,
) -> Transport:
    """A Transport of a path (PATH_TYPES), prediction (PREDICTIONS) and loss weight (LOSS_WEIGHTS; score and
    noise models only); train_eps / sample_eps None: the original's default (default_eps); time_schedule
    None: uniform. A bad name or value is a ValueError, an argument of another type a TypeError."""
    path_enum = _lookup(PATH_TYPES, path_type, "path type", "path_type")
    model_type = _lookup(PREDICTIONS, prediction, "prediction", "prediction")
    loss_type = _lookup(LOSS_WEIGHTS, loss_weight, "loss weight", "loss_weight")
    if model_type == ModelType.VELOCITY and loss_type != WeightType.NONE:
        raise ValueError(f"loss_weight {loss_weight!r} weights only score and noise losses; a velocity model's loss "
                         f"is never weighted: pass loss_weight=None, or prediction 'score' or 'noise'")
    default_train_eps, default_sample_eps = default_eps(path_enum, model_type)
    for name, value in (("train_eps", train_eps), ("sample_eps", sample_eps)):
        if value is not None:
            check_real(name, value)
        if value is not None and not 0 <= value < 0.5:
            raise ValueError(f"{name} must be in [0, 0.5), got {value}")
    return Transport(model_type=model_type, path_type=path_enum, loss_type=loss_type,
                     train_eps=default_train_eps if train_eps is None else train_eps,
                     sample_eps=default_sample_eps if sample_eps is None else sample_eps,
                     sample_eps_is_default=sample_eps is None, time_schedule=time_schedule)


__all__ = [
    "create_transport", "Transport", "Sampler", "ModelType", "PathType", "WeightType", "SampleFunction",
    "LikelihoodResult", "PATH_TYPES", "PREDICTIONS", "LOSS_WEIGHTS", "ODE_METHODS", "SDE_METHODS",
    "DIFFUSION_FORMS", "LAST_STEPS", "DEFAULT_SAMPLE_EPS", "default_eps", "TimeSchedule", "TIME_SAMPLINGS",
    "shift_time",
]
