"""plot_metrics.py's work: one PNG with a panel per quantity any run's metrics.jsonl has (loss, loss terms,
grad norm, lr when scheduled, FID, images/s), a line per run labelled by its folder, rollbacks dotted."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from sit.errors import UsageError
from sit.files import atomic_write
from sit.training.metrics_log import METRICS_FILE, read_records

PANEL_WIDTH, PANEL_HEIGHT, DPI = 6.0, 3.5, 100  # inches per panel; a PNG of 600 x 350 pixels per panel
COLUMNS = 2


@dataclass
class RunMetrics:
    """One run's curves: its label, each quantity's (steps, values) and the steps its rollbacks restored."""
    label: str
    curves: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    rollbacks: list[int] = field(default_factory=list)


def metrics_path(run: str) -> str:
    """A RUN argument's metrics.jsonl: the file itself, or <folder>/metrics.jsonl; UsageError naming the folder."""
    if os.path.isfile(run):
        return run
    path = os.path.join(run, METRICS_FILE)
    if not os.path.isfile(path):
        what = "folder" if os.path.isdir(run) else "path (no such folder)"
        raise UsageError(f"{run}: this {what} has no {METRICS_FILE} (train.py writes one in each experiment folder)")
    return path


def curves_of(records: Sequence[dict[str, Any]], label: str) -> RunMetrics:
    """Each quantity's curve (sorted by step; a repeated step takes its last value) from a run's records."""
    points: dict[str, dict[int, float]] = {}

    def add(quantity: str, step: int, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            points.setdefault(quantity, {})[step] = float(value)

    run = RunMetrics(label)
    for record in records:
        step, kind = record["step"], record.get("kind")
        if kind == "train":
            add("loss", step, record.get("loss"))
            for name, value in (record.get("terms") or {}).items():
                add(name, step, value)
            add("grad norm", step, record.get("grad_norm"))
            add("lr", step, record.get("lr"))
            add("images/s", step, record.get("images_per_sec"))
        elif kind == "fid":
            add("FID", step, record.get("fid"))
        elif kind == "rollback" and isinstance(record.get("restored_step"), int):
            run.rollbacks.append(record["restored_step"])
    run.curves = {quantity: (sorted(values), [values[step] for step in sorted(values)])
                  for quantity, values in points.items()}
    return run


def load_runs(runs: Sequence[str]) -> list[RunMetrics]:
    """The curves of each RUN (an experiment folder or its metrics.jsonl), labels made unique."""
    loaded, seen = [], {}
    for run in runs:
        path = metrics_path(run)
        folder = os.path.dirname(os.path.abspath(run)) if os.path.isfile(run) else os.path.abspath(run)
        label = os.path.basename(folder)  # the experiment folder's name
        seen[label] = seen.get(label, 0) + 1
        loaded.append(curves_of(read_records(path), label if seen[label] == 1 else f"{label} ({seen[label]})"))
    return loaded


def quantities(runs: Sequence[RunMetrics]) -> list[str]:
    """The panels: loss, the loss terms (first seen first), grad norm, lr (only if some run's lr changes),
    FID and images/s, each only when some run has it."""
    present: list[str] = []
    for run in runs:
        present.extend(quantity for quantity in run.curves if quantity not in present)
    varies = any(len(set(run.curves.get("lr", ((), ()))[1])) > 1 for run in runs)
    fixed = ("loss", "grad norm", "lr", "FID", "images/s")
    terms = [quantity for quantity in present if quantity not in fixed]
    order = ["loss", *terms, "grad norm", *(["lr"] if varies else []), "FID", "images/s"]
    return [quantity for quantity in order if quantity in present]


def plot_runs(runs: Sequence[str], output: str) -> list[str]:
    """Draw the runs' curves into one PNG at output (atomically); returns the quantities drawn.
    UsageError (one line) for a RUN without metrics.jsonl or runs without any record."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    loaded = load_runs(runs)
    panels = quantities(loaded)
    if not panels:
        raise UsageError(f"no records to plot in {', '.join(runs)}: a run writes its first at its first log line "
                         f"(--log-every)")
    columns = min(len(panels), COLUMNS)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(columns * PANEL_WIDTH, rows * PANEL_HEIGHT), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    colors = [f"C{index % 10}" for index in range(len(loaded))]
    for ax, quantity in zip(axes, panels):
        for run, color in zip(loaded, colors):
            if quantity in run.curves:
                steps, values = run.curves[quantity]
                ax.plot(steps, values, color=color, label=run.label, marker="o" if quantity == "FID" else None,
                        markersize=3)
            if quantity == "loss":
                for step in run.rollbacks:
                    ax.axvline(step, color=color, linestyle=":", linewidth=1)
        ax.set_title(quantity)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    atomic_write(output, lambda path: figure.savefig(path, format="png", dpi=DPI), suffix=".png")
    return panels
