"""The features a training run can switch on: one module each, listed here by name (a new feature is its
module plus its line in FEATURE_MODULES). Each module defines FEATURE (sit.training.extensions.Feature):
its declared settings and the loss term or loop extension it adds. Tests may add entries to FEATURES.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping, Optional

import torch

from sit.declarations import from_values
from sit.training.extensions import ExtensionContext, Feature, LoopExtension
from sit.training.terms import Objective, TermContext, TermFactory

FEATURE_MODULES = (
    "sit.training.repa",      # representation alignment: a loss term
    "sit.training.phema",     # post-hoc EMA snapshots: a loop extension
    "sit.training.healing",   # rollbacks on divergence: a loop extension
    "sit.training.metrics_log",  # metrics.jsonl (and --tensorboard): a loop extension, always on
    "sit.training.meanflow",  # --objective meanflow: the step's objective
)
FEATURES: dict[str, Feature] = {}
for _module in FEATURE_MODULES:
    _feature = importlib.import_module(_module).FEATURE
    FEATURES[_feature.name] = _feature


def feature_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Each feature's settings (None for a feature without any) from flat values keyed by destination."""
    return {name: from_values(feature.settings, values) if feature.settings else None
            for name, feature in FEATURES.items()}


def term_factories(settings: Mapping[str, Any], context: TermContext) -> list[TermFactory]:
    """The run's loss terms, set up once (e.g. their frozen encoders loaded), in the table's order."""
    made = (feature.term(settings.get(name), context) for name, feature in FEATURES.items() if feature.term)
    return [factory for factory in made if factory is not None]


def step_objective(settings: Mapping[str, Any]) -> Optional[Objective]:
    """The objective that replaces the transport's loss (None: the transport's); at most one feature gives one."""
    made = [feature.objective(settings.get(name)) for name, feature in FEATURES.items() if feature.objective]
    made = [objective for objective in made if objective is not None]
    if len(made) > 1:
        raise ValueError(f"two objectives replace the transport's loss: {', '.join(o.name for o in made)}")
    return made[0] if made else None


def model_options(settings: Mapping[str, Any]) -> dict:
    """SiT arguments that the features need (e.g. MeanFlow's second time input) beside --model/--model-config."""
    return {key: value for feature_settings in settings.values() if hasattr(feature_settings, "model_options")
            for key, value in feature_settings.model_options().items()}


def loop_extensions(config: Any, model: torch.nn.Module, saved: Mapping[str, dict]) -> list[LoopExtension]:
    """The run's loop extensions in the table's order; saved: the resumed checkpoint's states by name."""
    made = (feature.extension(config.features.get(name), ExtensionContext(config, model, saved.get(name)))
            for name, feature in FEATURES.items() if feature.extension)
    return [extension for extension in made if extension is not None]
