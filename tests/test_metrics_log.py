"""metrics.jsonl (sit/training/metrics_log.py), --tensorboard and plot_metrics.py: a resume's truncation
keeps earlier lines byte for byte, rollbacks and FID measurements are records of their own, TensorBoard
gets the same scalars (or a one-line refusal without the package), and plot_metrics.py overlays runs in
one PNG of the expected size, or says in one line which RUN has no metrics.jsonl."""
import json
import os
import sys
from types import SimpleNamespace

import pytest
from PIL import Image

import plot_metrics
import train
from sit.cli import run_main
from sit.errors import UsageError
from sit.training.metrics_log import METRICS_FILE, MetricsLog, MetricsSettings, keep_through, read_records
from test_lr_schedule import PIXELS, data_folder
from test_terms import BATCH, NAN_BATCH, write_features
from test_train import TINY, only_experiment


def test_keep_through_drops_later_steps_and_a_partial_line_keeping_the_rest_byte_for_byte(tmp_path):
    path = tmp_path / METRICS_FILE
    kept = '{"kind": "train", "step": 1, "loss": 0.5}\n{"kind": "fid", "step": 2, "fid": 9.25}\n'
    path.write_text(kept + '{"kind": "train", "step": 3, "loss": 0.4}\n{"kind": "train", "st')
    assert keep_through(str(path), 2) == 2
    assert path.read_text() == kept
    assert keep_through(str(path), 2) == 0 and keep_through(str(tmp_path / "absent.jsonl"), 5) == 0


def test_a_fid_measurement_is_a_record_of_its_own_after_the_steps(tmp_path):
    """The loop tells the extensions what log_fid measured: it becomes a "fid" record of that step."""
    lines = []
    run = SimpleNamespace(ctx=SimpleNamespace(is_main=True), experiment_dir=str(tmp_path), fid_monitor=None,
                          state=SimpleNamespace(train_steps=0), logger=None, extensions=[],
                          config=SimpleNamespace(fid=SimpleNamespace(fid_num_samples=64)),
                          monitor=SimpleNamespace(take_logged=lambda: lines.pop() if lines else None),
                          step=SimpleNamespace(opt=SimpleNamespace(param_groups=[{"lr": 1e-4}])),
                          write_on_main=lambda what, path, write: write())
    log = MetricsLog(MetricsSettings())
    log.start(run)
    run.state.train_steps = 4
    lines.append({"step": 4, "loss": 0.25, "terms": {}, "grad_norm": None, "steps_per_sec": 2.0, "images_per_sec": 8.0})
    log.measured(run, "fid", 12.5)  # what log_fid reports, between the log line and before_checkpoint
    log.before_checkpoint(run)
    run.state.train_steps = 5
    log.before_checkpoint(run)  # no log line, no FID: nothing written
    records = read_records(str(tmp_path / METRICS_FILE))
    assert [{key: record[key] for key in ("kind", "step")} for record in records] == [
        {"kind": "train", "step": 4}, {"kind": "fid", "step": 4}]
    assert records[0]["lr"] == 1e-4 and "terms" not in records[0] and "grad_norm" not in records[0]
    assert records[1]["fid"] == 12.5 and records[1]["num_samples"] == 64


def feature_run(features: str, results: str, *more: str) -> None:
    train.main(["--feature-path", features, *TINY, "--results-dir", results, "--global-batch-size", str(BATCH),
                "--log-every", "1", "--ckpt-every", "100000", "--sample-every", "100000", "--num-workers", "0", *more])


@pytest.mark.slow
def test_a_rollback_is_a_record_and_the_rolled_back_steps_are_logged_once(tmp_path):
    """A NaN at step 4 rolls back to step 2: the file holds steps 1-2, the rollback (step 3: the first trained
    again), then 3-6 of the healed run; the same as a run told to skip that batch, but for that record."""
    features = write_features(str(tmp_path / "features"), nan_at=NAN_BATCH)
    feature_run(features, str(tmp_path / "healed"), "--max-steps", "6", "--max-rollbacks", "1", "--rollback-every", "2")
    feature_run(features, str(tmp_path / "told"), "--max-steps", "6", "--skip-batches", "{}:{}".format(*NAN_BATCH))
    healed = read_records(os.path.join(only_experiment(str(tmp_path / "healed")), METRICS_FILE))
    told = read_records(os.path.join(only_experiment(str(tmp_path / "told")), METRICS_FILE))
    assert [(record["kind"], record["step"]) for record in healed] == [
        ("train", 1), ("train", 2), ("rollback", 3), ("train", 3), ("train", 4), ("train", 5), ("train", 6)]
    rollback = healed[2]
    assert (rollback["restored_step"], rollback["diverged_step"], rollback["skipped_batch"]) == (2, 4, list(NAN_BATCH))
    assert "non-finite" in rollback["reason"]
    assert [record["loss"] for record in healed if record["kind"] == "train"] == [record["loss"] for record in told]


@pytest.mark.slow
def test_tensorboard_gets_the_same_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = str(tmp_path / "results")
    train.main(["--data-path", data_folder(tmp_path), *PIXELS, "--results-dir", results, "--max-steps", "3",
                "--ckpt-every", "100000", "--tensorboard"])
    experiment = only_experiment(results)
    events = EventAccumulator(os.path.join(experiment, "tensorboard"))
    events.Reload()
    records = read_records(os.path.join(experiment, METRICS_FILE))
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/images_per_sec", "images_per_sec")):
        scalars = events.Scalars(tag)
        assert [scalar.step for scalar in scalars] == [1, 2, 3]
        assert [scalar.value for scalar in scalars] == pytest.approx([record[key] for record in records])


def test_tensorboard_without_the_package_is_one_line_before_anything_is_made(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # an import of it now fails, as when not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UsageError) as error:
        train.main(["--data-path", data_folder(tmp_path), *PIXELS, "--results-dir", str(tmp_path / "results"),
                    "--max-steps", "1", "--tensorboard"])
    assert "pip install tensorboard" in str(error.value) and "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "results")


def write_run(folder, records) -> str:
    os.makedirs(folder)
    with open(os.path.join(folder, METRICS_FILE), "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    return str(folder)


def train_records(lrs, loss0: float, terms: bool = False) -> list:
    return [dict(kind="train", step=step, loss=loss0 / step, lr=lr, steps_per_sec=3.0, images_per_sec=12.0 + step,
                 time=1.0, **({"terms": {"Toy Loss": 0.1 * step}} if terms else {}))
            for step, lr in enumerate(lrs, start=1)]


def test_plot_metrics_overlays_two_runs_in_one_png(tmp_path, capsys):
    first = write_run(tmp_path / "000-SiT-S-2-a", train_records([1e-4] * 4, 1.0, terms=True)
                      + [dict(kind="fid", step=4, fid=40.0, num_samples=8, time=1.0)])
    second = write_run(tmp_path / "001-SiT-S-2-b", train_records([5e-5, 1e-4, 1e-4, 5e-5], 0.9)
                       + [dict(kind="rollback", step=3, restored_step=2, diverged_step=3, reason="x",
                               skipped_batch=None, time=1.0)])
    output = str(tmp_path / "compare.png")
    plot_metrics.main([first, second, "--output", output])
    # loss, Toy Loss, lr (it changes in the second run), FID, images/s: 5 panels, 2 columns x 3 rows of 600 x 350
    assert "loss, Toy Loss, lr, FID, images/s of 2 runs" in capsys.readouterr().out
    with Image.open(output) as image:
        image.load()
        assert image.format == "PNG" and image.size == (1200, 1050)
    plot_metrics.main([second, "-o", output])  # one run: loss, lr, images/s
    with Image.open(output) as image:
        assert image.size == (1200, 700)


def test_plot_metrics_names_the_run_without_metrics_in_one_line(tmp_path, capsys):
    good = write_run(tmp_path / "000-good", train_records([1e-4] * 2, 1.0))
    empty = tmp_path / "001-empty"
    empty.mkdir()
    code = run_main(lambda: plot_metrics.main([good, str(empty), "-o", str(tmp_path / "out.png")]), "plot_metrics.py")
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert str(empty) in lines[0] and METRICS_FILE in lines[0]
    assert not os.path.exists(tmp_path / "out.png")


def test_a_link_planted_at_the_metrics_file_is_not_written_through(tmp_path):
    from sit.training.metrics_log import append_records

    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file\n")
    os.symlink(victim, tmp_path / METRICS_FILE)
    with pytest.raises(OSError):
        append_records(str(tmp_path / METRICS_FILE), [{"kind": "train", "step": 1, "loss": 0.5}])
    assert victim.read_text() == "someone else's file\n"
    append_records(str(tmp_path / "fresh.jsonl"), [{"kind": "train", "step": 1, "loss": 0.5}])
    assert read_records(str(tmp_path / "fresh.jsonl")) == [{"kind": "train", "step": 1, "loss": 0.5}]
