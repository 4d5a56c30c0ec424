"""The sampler families of sample.py and sample_ddp.py, one entry each (a `sit.config.SamplerFamily`):
the scripts' mode choices, flag groups, folder names and records all come from this table.
A new family is one module and its entry here (docs/ARCHITECTURE.md, "Add a sampler")."""
from __future__ import annotations

from sit.config import ODEConfig, SamplerFamily, SDEConfig
from sit.errors import UsageError
from sit.sampling.meanflow import MeanFlowConfig

SAMPLER_FAMILIES: dict[str, type[SamplerFamily]] = {"ODE": ODEConfig, "SDE": SDEConfig, "MeanFlow": MeanFlowConfig}


def mode_names(joiner: str = " or ") -> str:
    """The modes in words, e.g. `ODE or SDE`."""
    return joiner.join(SAMPLER_FAMILIES)


def family(mode: str) -> type[SamplerFamily]:
    """The family of a mode; UsageError naming the modes for another."""
    if mode not in SAMPLER_FAMILIES:
        raise UsageError(f"unknown sampling mode {mode!r}; choose one of {mode_names(', ')}")
    return SAMPLER_FAMILIES[mode]
