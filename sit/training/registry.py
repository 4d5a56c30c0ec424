"""The features a training run can switch on, one table each; a new one is its module plus its entry here.

LOSS_TERMS: a term's name -> setup(the run's TrainConfig, TermContext) -> a TermFactory, or None when the
settings leave the term off (sit.training.terms).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from sit.training.repa import setup_repa
from sit.training.terms import TermContext, TermFactory

LOSS_TERMS: dict[str, Callable[[Any, TermContext], Optional[TermFactory]]] = {"repa": setup_repa}


def term_factories(config: Any, context: TermContext) -> list[TermFactory]:
    """The run's loss terms, set up once (e.g. their frozen encoders loaded), in the table's order."""
    made = (setup(config, context) for setup in LOSS_TERMS.values())
    return [factory for factory in made if factory is not None]
