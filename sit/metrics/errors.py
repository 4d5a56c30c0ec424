"""What the metrics raise for input the user can fix: a batch or statistics file they named, or weights."""
from __future__ import annotations

from sit.errors import UsageError


class MetricInputError(UsageError):
    """A batch or statistics file the metrics cannot use; the message names the file or what falls short."""


class InceptionWeightsError(UsageError):
    """The Inception weights could not be fetched or read; the message says what to pass instead."""
