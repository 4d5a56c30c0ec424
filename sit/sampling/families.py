"""The sampler families of sample.py and sample_ddp.py, one entry each (a `sit.config.SamplerFamily`):
the scripts' mode choices, flag groups, folder names and records all come from this table.
A new family is one module and its entry here (docs/ARCHITECTURE.md, "Add a sampler")."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from sit.config import ODEConfig, SamplerFamily, SDEConfig
from sit.errors import UsageError
from sit.sampling.meanflow import MeanFlowConfig
from transport import Sampler, Transport

SAMPLER_FAMILIES: dict[str, type[SamplerFamily]] = {"ODE": ODEConfig, "SDE": SDEConfig, "MeanFlow": MeanFlowConfig}


def mode_names(joiner: str = " or ") -> str:
    """The modes in words, e.g. `ODE or SDE`."""
    return joiner.join(SAMPLER_FAMILIES)


def family(mode: str) -> type[SamplerFamily]:
    """The family of a mode; UsageError naming the modes for another."""
    if mode not in SAMPLER_FAMILIES:
        raise UsageError(f"unknown sampling mode {mode!r}; choose one of {mode_names(', ')}")
    return SAMPLER_FAMILIES[mode]


def training_sample_fn(model_config: Mapping[str, Any], transport: Transport, velocity_steps: int,
                       jumps: int) -> Callable:
    """The fixed-step sampler of training's previews and FID: the Euler ODE on `velocity_steps` points for a
    velocity model; for a model of average velocities (ModelConfig.mean_flow), `jumps` jumps of the family
    that samples those, as the sampling scripts would."""
    sampler = Sampler(transport)
    if model_config.get("mean_flow"):
        averaged = next(kind for kind in SAMPLER_FAMILIES.values() if kind.average_velocity)
        return averaged(num_steps=jumps).sample_fn(sampler)
    return sampler.sample_ode(sampling_method="euler", num_steps=velocity_steps, keep_trajectory=False)
