"""--weight-decay and --lr-schedule (sit/training/lr_schedule.py): the schedules' values against their
formulas, the one-line refusals, and a real tiny train.py run with both that resumes bit-exact (model,
EMA, AdamW state) and whose metrics.jsonl, interrupted and resumed, equals the straight run's."""
import json
import math
import os

import pytest
import torch

import train
from conftest import assert_names, make_image_folder
from sit.errors import RunFailure, UsageError
from sit.training.extensions import Feature, LoopExtension
from sit.training.lr_schedule import LRSchedule, scheduled_lr
from sit.training.metrics_log import METRICS_FILE, read_records
from sit.training.registry import FEATURES
from test_train import load, only_experiment

LR = 1e-3
PIXELS = ["--vae", "none", "--image-size", "8", "--num-classes", "2", "--model", "SiT-S/2", "--model-config",
          json.dumps({"depth": 1, "hidden_size": 32, "num_heads": 2}), "--global-batch-size", "2", "--num-workers", "0",
          "--log-every", "1", "--sample-every", "100000"]
OPTIMISER = ["--lr", str(LR), "--weight-decay", "0.05", "--lr-schedule", "warmup-cosine", "--warmup-steps", "2"]


def without_wall_clock(record: dict) -> dict:
    """A metrics record without its wall-clock fields (what two runs of the same settings agree on)."""
    wall_clock = ("time", "steps_per_sec", "images_per_sec")
    return {key: value for key, value in record.items() if key not in wall_clock}


def test_constant_is_the_base_lr_at_every_step():
    assert [scheduled_lr("constant", 1e-4, step) for step in (1, 7, 10 ** 6)] == [1e-4] * 3


def test_warmup_cosine_against_its_formula():
    base, warmup, total = 2e-4, 10, 110
    at = lambda step: scheduled_lr("warmup-cosine", base, step, warmup, total)  # noqa: E731
    assert at(1) == pytest.approx(base / 10) and at(5) == pytest.approx(base / 2) and at(10) == pytest.approx(base)
    assert at(11) == pytest.approx(base)  # the cosine starts at the peak
    assert at(61) == pytest.approx(base / 2)  # half way: cos(pi/2) = 0
    assert at(60) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 49 / 100)))
    assert 0 < at(110) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(at(step) > at(step + 1) for step in range(11, 110))
    assert scheduled_lr("warmup-cosine", base, 1, 0, 4) == base  # no warmup: the cosine from step 1


def test_inverse_sqrt_against_its_formula():
    base = 1e-3
    assert scheduled_lr("inverse-sqrt", base, 50, 100) == pytest.approx(base / 2)
    assert scheduled_lr("inverse-sqrt", base, 100, 100) == pytest.approx(base)
    assert scheduled_lr("inverse-sqrt", base, 400, 100) == pytest.approx(base / 2)
    assert scheduled_lr("inverse-sqrt", base, 2500, 100) == pytest.approx(base / 5)
    assert scheduled_lr("inverse-sqrt", base, 4, 0) == pytest.approx(base / 2)  # no warmup: base / sqrt(step)


def test_the_schedule_object_gives_the_lr_of_the_next_step():
    schedule = LRSchedule("warmup-cosine", 1.0, 4, 8)
    assert [schedule.lr(done) for done in range(4)] == [0.25, 0.5, 0.75, 1.0]


def data_folder(tmp_path) -> str:
    return make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=4, size=8)


@pytest.mark.parametrize("flags, named", [
    (["--lr-schedule", "warmup-cosine"], ["--lr-schedule warmup-cosine", "--max-steps"]),
    (["--lr-schedule", "warmup-cosine", "--warmup-steps", "5", "--max-steps", "5"], ["--warmup-steps 5", "--max-steps 5"]),
    (["--warmup-steps", "5"], ["--warmup-steps", "--lr-schedule warmup-cosine or inverse-sqrt"]),
])
def test_settings_that_cannot_work_are_one_line_before_anything_is_made(flags, named, tmp_path):
    with pytest.raises(UsageError) as error:
        train.main(["--data-path", data_folder(tmp_path), *PIXELS, "--results-dir", str(tmp_path / "results"), *flags])
    assert "\n" not in str(error.value)
    assert_names(str(error.value), *named)
    assert not os.path.exists(tmp_path / "results")


class CrashAt(LoopExtension):
    """Stands for a killed run: fails after step `step` (its metrics are written, its checkpoint is not)."""
    name = "crash"

    def __init__(self, step: int):
        self.step = step

    def step_done(self, run, saved: bool) -> None:
        if run.state.train_steps == self.step:
            raise RunFailure(f"crashed at step {self.step}")


def run_train(data: str, results: str, *more: str) -> None:
    train.main(["--data-path", data, *PIXELS, "--results-dir", results, *OPTIMISER, *more])


@pytest.fixture(scope="module")
def scheduled_runs(tmp_path_factory):
    """6 steps straight; and 6 steps that crash after step 5 (checkpoint at 3), resumed to 6."""
    root = tmp_path_factory.mktemp("schedule")
    data = data_folder(root)
    run_train(data, str(root / "straight"), "--max-steps", "6", "--ckpt-every", "3")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(FEATURES, "crash", Feature("crash", extension=lambda settings, context: CrashAt(5)))
        with pytest.raises(RunFailure, match="crashed at step 5"):
            run_train(data, str(root / "interrupted"), "--max-steps", "6", "--ckpt-every", "3")
    interrupted = only_experiment(str(root / "interrupted"))
    crashed_records = read_records(os.path.join(interrupted, METRICS_FILE))
    train.main(["--resume", interrupted, "--data-path", data, "--max-steps", "6", "--num-workers", "0",
                "--log-every", "1", "--ckpt-every", "3", "--sample-every", "100000"])
    return dict(straight=only_experiment(str(root / "straight")), interrupted=interrupted, crashed=crashed_records)


@pytest.mark.slow
def test_weight_decay_and_schedule_resume_bit_exact(scheduled_runs):
    straight = load(os.path.join(scheduled_runs["straight"], "checkpoints", "0000006.pt"))
    resumed = load(os.path.join(scheduled_runs["interrupted"], "checkpoints", "0000006.pt"))
    for key in ("model", "ema"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs"
    for index, state in straight["opt"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, resumed["opt"]["state"][index][name]), f"opt state {index}.{name} differs"
    assert straight["opt"]["param_groups"] == resumed["opt"]["param_groups"]
    group = resumed["opt"]["param_groups"][0]
    assert group["weight_decay"] == 0.05 and group["lr"] == pytest.approx(scheduled_lr("warmup-cosine", LR, 6, 2, 6))
    assert (resumed["args"]["lr_schedule"], resumed["args"]["warmup_steps"], resumed["args"]["weight_decay"]) == \
        ("warmup-cosine", 2, 0.05)


@pytest.mark.slow
def test_metrics_of_a_crashed_and_resumed_run_equal_the_straight_runs(scheduled_runs):
    assert [record["step"] for record in scheduled_runs["crashed"]] == [1, 2, 3, 4, 5]  # 4 and 5: after the checkpoint
    straight = read_records(os.path.join(scheduled_runs["straight"], METRICS_FILE))
    resumed = read_records(os.path.join(scheduled_runs["interrupted"], METRICS_FILE))
    assert [record["step"] for record in resumed] == [1, 2, 3, 4, 5, 6]
    assert [without_wall_clock(record) for record in straight] == [without_wall_clock(record) for record in resumed]
    expected = [scheduled_lr("warmup-cosine", LR, step, 2, 6) for step in range(1, 7)]
    assert [record["lr"] for record in resumed] == pytest.approx(expected)
    assert all(record["kind"] == "train" and math.isfinite(record["loss"]) and record["images_per_sec"] > 0
               for record in resumed)


def test_weight_decay_zero_is_todays_optimiser(tmp_path):
    """The default --weight-decay 0.0 and constant schedule step AdamW exactly as before (lr never touched)."""
    from models import SiT
    from sit.training.step import TrainStep, train_step
    from transport import create_transport

    steps = []
    for options in ({}, {"weight_decay": 0.0, "lr_schedule": None}):
        torch.manual_seed(0)
        model = SiT(input_size=4, in_channels=3, num_classes=2, depth=1, hidden_size=32, num_heads=2)
        step = TrainStep.create(model, transport=create_transport(), device=torch.device("cpu"), lr=1e-3, **options)
        torch.manual_seed(1)
        for _ in range(2):
            train_step(step, [torch.randn(2, 3, 4, 4)], torch.tensor([0, 1]))
        steps.append(step)
    for first, second in zip(steps[0].model.parameters(), steps[1].model.parameters()):
        assert torch.equal(first, second)
    assert steps[1].steps_done == 2 and steps[1].opt.param_groups[0]["lr"] == 1e-3
