"""The metrics log: <experiment>/metrics.jsonl, one JSON record a line (keys: docs/training.md), appended by
rank 0 at each log line, FID measurement and rollback (--tensorboard: the same scalars). A resume or rollback
first drops the records after the step it restores, so the file equals an uninterrupted run's but for its
wall-clock fields (time, steps_per_sec, images_per_sec)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from time import time
from typing import Any, ClassVar, Iterable, Optional

from sit.declarations import declare
from sit.errors import UsageError
from sit.files import atomic_text
from sit.training.extensions import Feature, LoopExtension

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_FOLDER = "tensorboard"
TENSORBOARD_MISSING = "--tensorboard needs the tensorboard package: pip install tensorboard (or drop --tensorboard)"


def tensorboard_writer_class() -> Optional[type]:
    """torch's SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


@dataclass(frozen=True)
class MetricsSettings:
    """--tensorboard (metrics.jsonl itself is always written: it is small, and resumes keep it exact)."""
    TITLE: ClassVar[str] = "metrics log (<experiment>/metrics.jsonl, always written; plot_metrics.py draws it)"
    tensorboard: bool = declare(False, "also write the logged scalars (loss, terms, grad norm, lr, img/s, FID) to "
                                       "<experiment>/tensorboard for TensorBoard (needs the tensorboard package)",
                                action="store_true")

    def check(self, config: Any = None) -> None:
        """UsageError (one line) for --tensorboard without the tensorboard package."""
        if self.tensorboard and tensorboard_writer_class() is None:
            raise UsageError(TENSORBOARD_MISSING)


def parse_line(line: str) -> Optional[dict[str, Any]]:
    """A line's record, or None for a line that is not one (e.g. the partial last line of a killed run)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in file order (lines that are not records are skipped)."""
    with open(path) as handle:
        return [record for line in handle if (record := parse_line(line)) is not None]


def keep_through(path: str, step: int) -> int:
    """Drop the records of steps above `step` (and lines that are not records) from the file at path,
    atomically; the kept lines stay byte for byte. Returns how many lines were dropped (0: untouched)."""
    if not os.path.isfile(path):
        return 0
    with open(path) as handle:
        lines = handle.readlines()
    kept = [line for line in lines
            if line.endswith("\n") and (record := parse_line(line)) is not None and record["step"] <= step]
    if len(kept) != len(lines):
        atomic_text(path, "".join(kept), suffix=".jsonl")
    return len(lines) - len(kept)


def append_records(path: str, records: Iterable[dict[str, Any]]) -> None:
    """Append records to the file at path and flush (a link planted at path is refused: OSError)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(descriptor, "a") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records))
        handle.flush()


class MetricsLog(LoopExtension):
    """Appends the records to metrics.jsonl (rank 0; every rank joins the outcome), and to TensorBoard."""
    name = "metrics_log"

    def __init__(self, settings: MetricsSettings):
        self.settings = settings
        self.path: Optional[str] = None  # rank 0's metrics.jsonl
        self.writer: Any = None  # rank 0's SummaryWriter, with --tensorboard
        self.fid: Optional[float] = None  # measured at this step, not recorded yet

    def start(self, run: Any) -> None:
        """Drop the records after the step the run starts at (a resume), open TensorBoard."""
        if run.ctx.is_main:
            self.path = os.path.join(run.experiment_dir, METRICS_FILE)
        self.rewind(run, run.state.train_steps)

    def measured(self, run: Any, name: str, value: float) -> None:
        if name == "fid":
            self.fid = value

    def rewind(self, run: Any, step: int) -> None:
        """Keep the records through `step` only (rank 0; every rank joins); TensorBoard hides the later ones."""
        path = self.path

        def write() -> None:
            dropped = keep_through(path, step)
            if dropped:
                run.logger.info(f"Dropped {dropped} records after step {step} from {path}")
            if self.settings.tensorboard:
                if self.writer is not None:
                    self.writer.close()
                writer_class = tensorboard_writer_class()  # installed: MetricsSettings.check made sure
                self.writer = writer_class(log_dir=os.path.join(run.experiment_dir, TENSORBOARD_FOLDER),
                                           purge_step=step + 1 if step > 0 else None)

        run.write_on_main("metrics log", path, write)

    def before_checkpoint(self, run: Any) -> None:
        """The step's log line and FID measurement, if any, as records (every rank decides alike)."""
        step, now = run.state.train_steps, time()
        records = []
        logged = run.monitor.take_logged()
        if logged is not None:
            records.append(train_record(logged, float(run.step.opt.param_groups[0]["lr"]), now))
        fid, self.fid = self.fid, None
        if fid is not None:
            records.append({"kind": "fid", "step": step, "fid": fid,
                            "num_samples": run.config.fid.fid_num_samples, "time": now})
        if records:
            self.write(run, records)

    def restore(self, run: Any, state: dict) -> None:
        """A rollback: drop the rolled-back steps' records, then record the rollback."""
        restored = run.step.steps_done  # the rollback point's step (run.state still holds the diverged one)
        last = next((extension.rollbacks for extension in run.extensions
                     if getattr(extension, "rollbacks", None)), [{}])[-1]
        self.fid = None
        self.rewind(run, restored)
        self.write(run, [{"kind": "rollback", "step": restored + 1, "restored_step": restored,
                          "diverged_step": last.get("step"), "reason": last.get("reason"),
                          "skipped_batch": last.get("skipped_batch"), "time": time()}])

    def end(self, run: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def write(self, run: Any, records: list[dict[str, Any]]) -> None:
        """Rank 0 appends the records (and their scalars to TensorBoard); every rank joins the outcome."""
        path = self.path

        def write() -> None:
            append_records(path, records)
            if self.writer is not None:
                for record in records:
                    for tag, value in scalars(record).items():
                        self.writer.add_scalar(tag, value, record["step"])
                self.writer.flush()

        run.write_on_main("metrics log", path, write)


def train_record(logged: dict[str, Any], lr: float, now: float) -> dict[str, Any]:
    """A log line's record (see the module docstring) from log_progress's values."""
    record: dict[str, Any] = {"kind": "train", "step": logged["step"], "loss": logged["loss"]}
    if logged["terms"]:
        record["terms"] = dict(logged["terms"])
    if logged["grad_norm"] is not None:
        record["grad_norm"] = logged["grad_norm"]
    record.update(lr=lr, steps_per_sec=logged["steps_per_sec"], images_per_sec=logged["images_per_sec"], time=now)
    return record


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's TensorBoard scalars by tag (train/..., fid); a rollback has none."""
    if record["kind"] == "fid":
        return {"fid": record["fid"]}
    if record["kind"] != "train":
        return {}
    values = {f"train/{key}": record[key] for key in ("loss", "grad_norm", "lr", "steps_per_sec", "images_per_sec")
              if key in record}
    values.update({f"train/{name}": value for name, value in record.get("terms", {}).items()})
    return values


FEATURE = Feature("metrics_log", MetricsSettings, extension=lambda settings, context: MetricsLog(settings))
