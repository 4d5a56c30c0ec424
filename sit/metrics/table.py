"""The metrics evaluate.py offers (`--metrics`), the network each needs, and the printed table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sit.errors import UsageError


@dataclass(frozen=True)
class Metric:
    key: str  # its key in Evaluator.evaluate's result and the --json output
    label: str  # its row in the printed table
    network: str  # the features it is computed from: "inception" or "dinov2"


# --metrics name -> metric, in the table's order.
METRICS = {
    "is": Metric("inception_score", "Inception Score", "inception"),
    "fid": Metric("fid", "FID", "inception"),
    "sfid": Metric("sfid", "sFID", "inception"),
    "precision": Metric("precision", "Precision", "inception"),
    "recall": Metric("recall", "Recall", "inception"),
    "fd_dinov2": Metric("fd_dinov2", "FD-DINOv2", "dinov2"),
}
DEFAULT_METRICS = ("is", "fid", "sfid", "precision", "recall")  # the ADM suite's set


def parse_metric_list(text: str) -> tuple[str, ...]:
    """"fid,fd_dinov2" -> ("fid", "fd_dinov2") in the table's order; UsageError naming the valid ones otherwise."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        what = f"unknown metric {unknown[0]!r}" if unknown else "no metric named"
        raise UsageError(f"--metrics {text!r}: {what}; choose from {','.join(METRICS)}")
    return tuple(name for name in METRICS if name in names)


def format_table(result: dict, names: Sequence[str]) -> str:
    """One row per requested metric (n/a where it could not be computed), then why, one line per reason."""
    lines = [f"{'Metric':<16} {'Value':>12}"]
    for name in names:
        value = result.get(METRICS[name].key)
        lines.append(f"{METRICS[name].label:<16} {'n/a' if value is None else format(value, '12.4f'):>12}")
    notes = [result["notes"][METRICS[name].key] for name in names if METRICS[name].key in result.get("notes", {})]
    lines.extend(f"note: {note}" for note in dict.fromkeys(notes))  # precision and recall share theirs
    return "\n".join(lines)
