"""What several tests ask of train.py's settings: the resolved configuration and its warnings."""
from typing import Any, AbstractSet, Mapping, Optional

from sit.training.settings import TrainConfig, resolve_train_settings


def resolve_train_config(flags: Mapping[str, Any], explicit: AbstractSet[str],
                         stored: Optional[Mapping[str, Any]] = None,
                         **options: Any) -> tuple[TrainConfig, list[str]]:
    """resolve_train_settings' configuration, and the warnings of settings unlike the checkpoint's."""
    config, resolved = resolve_train_settings(flags, explicit, stored, **options)
    return config, resolved.warnings
