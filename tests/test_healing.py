"""Self-healing training (sit.training.healing): spikes against the last good state's median, rollback points
that later steps cannot touch, and real 2-process (Gloo) runs on cached latents with a corrupted
batch: a NaN and a spike roll back, skip their batches and end with the weights of a run told to
skip those batches (bit for bit), every checkpoint kept; past --max-rollbacks the run stops (exit 1)
keeping the last good checkpoint; a healed run resumes exactly."""
import argparse
import logging
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

from sit.checkpoint import TrainCheckpoint
from sit.data.features import open_arrays, open_token_array, write_meta
from sit.data.order import ResumableDistributedSampler
from sit.declarations import check_needs
from sit.errors import UsageError
from sit.training.healing import SPIKE_MIN_HISTORY, Healer, HealingSettings, LossSpiked, batch_positions
from sit.training.monitor import LossMonitor, TrainingDiverged
from sit.training.step import StepResult
from test_train import TINY, assert_ok, load, logged_losses, only_experiment, run_train
from conftest import assert_names, write_cached_latents

NUM_LATENTS, GLOBAL_BATCH = 64, 4  # 2 ranks x 2: 16 batches an epoch
NAN_BATCH, SPIKE_BATCH = (0, 4), (0, 12)  # the data of step 5, and of step 12 once batch 4 is skipped
HEALING = ["--max-rollbacks", "2", "--spike-factor", "3", "--rollback-every", "2"]  # points at 2, 4, 6, ... and checkpoints


def settings(**changes) -> HealingSettings:
    return HealingSettings(**{**dict(max_rollbacks=2, spike_factor=None, rollback_every=None, skip_batches=None),
                              **changes})


def test_skip_batches_parses_epoch_batch_pairs():
    assert batch_positions("2:31, 0:7,0:7") == ((0, 7), (2, 31))
    for bad in ("7", "0:-1", "a:b", "1:2:3", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="EPOCH:BATCH"):
            batch_positions(bad)


def test_settings_that_cannot_work_are_one_line_naming_the_flag():
    with pytest.raises(UsageError, match=r"^--spike-factor .*0.5"):
        settings(spike_factor=0.5).check()
    with pytest.raises(UsageError, match="^--rollback-every .*--max-rollbacks"):
        check_needs(settings(max_rollbacks=0, rollback_every=10), {"rollback_every"})
    assert not settings(max_rollbacks=0).enabled and settings(max_rollbacks=0, skip_batches=((0, 1),)).enabled


def test_a_spike_is_a_loss_above_factor_times_the_running_median_each_step_checked_once():
    healer = Healer(settings(spike_factor=3.0), ckpt_every=100)
    monitor = LossMonitor(1, [healer.inspect_loss])
    # median 1.5: 4.5 is not above 3 x 1.5; with it the median is 2.0, and 6.5 is above 3 x 2.0
    losses = [1.0, 2.0] * (SPIKE_MIN_HISTORY // 2) + [4.5, 6.5]
    for value in losses[:-1]:
        monitor.add(StepResult(torch.tensor(value)))
    monitor.check(monitor.reduced())
    monitor.check(monitor.reduced())  # a checkpoint's check, then a log line's: each step is inspected once
    assert list(healer.recent_losses) == losses[:-1]
    monitor.add(StepResult(torch.tensor(losses[-1])))
    with pytest.raises(LossSpiked) as error:
        monitor.flush(len(losses) + 1)
    assert error.value.step == len(losses)
    assert str(error.value) == f"the loss spiked to 6.5000 at step {len(losses)} (above 3.0 x the running median 2.0000)"


def test_no_spike_is_called_before_enough_history():
    healer = Healer(settings(spike_factor=2.0), ckpt_every=100)
    for step, value in enumerate([1.0] * (SPIKE_MIN_HISTORY - 1) + [50.0], start=1):
        healer.inspect_loss(step, value)  # the 10th value is compared with nothing yet
    with pytest.raises(LossSpiked):
        healer.inspect_loss(SPIKE_MIN_HISTORY + 1, 50.0)


def test_a_slow_divergence_is_a_spike_against_the_last_good_states_median():
    """Losses creeping up 2% a step drag a running median along (it is the loss of ~50 steps before, at most
    1.02^50 = 2.7 below): the running median never calls it. Against the median at the last good state
    (here: after 20 losses of 1.0, a checkpoint) the loss is a spike once it passes 3.0."""
    healer = Healer(settings(spike_factor=3.0, max_rollbacks=0), ckpt_every=100)
    for step in range(1, 21):
        healer.inspect_loss(step, 1.0)
    healer.found_good()  # what a checkpoint's or rollback point's checked state does
    assert healer.reference == 1.0 and healer.state_dict()["spike_reference"] == 1.0
    with pytest.raises(LossSpiked) as error:
        for step in range(21, 200):
            healer.inspect_loss(step, 1.02 ** (step - 20))
    assert error.value.step == 21 + math.ceil(math.log(3.0) / math.log(1.02)) - 1  # the first loss above 3.0
    assert_names(str(error.value), "the median at the last good state 1.0000")
    resumed = Healer(settings(spike_factor=3.0), ckpt_every=100, saved=healer.state_dict())
    assert resumed.reference == 1.0  # a resume checks against the same median


def test_rollbacks_that_run_out_say_what_is_likely_wrong():
    weights = {"w": torch.zeros(1)}
    point = TrainCheckpoint(model=weights, ema=weights, opt={"state": {}}, settings={}, model_config={},
                            train_steps=4)
    for positions, advice in (({5: (0, 5), 6: (0, 7)}, "--lr"), ({5: (0, 5), 9: (1, 2)}, "data")):
        healer = Healer(settings(max_rollbacks=2), ckpt_every=4)
        healer.keep(point)
        for step, position in positions.items():
            healer.positions[step] = position
            healer.roll_back(TrainingDiverged(f"the loss became non-finite (nan) at step {step}", step),
                             logging.getLogger("t"))
            if advice == "data":
                healer.keep(TrainCheckpoint(model=weights, ema=weights, opt={"state": {}}, settings={},
                                            model_config={}, train_steps=8))
        with pytest.raises(TrainingDiverged) as error:
            healer.roll_back(TrainingDiverged("the loss became non-finite (nan) at step 12", 12), logging.getLogger("t"))
        assert_names(str(error.value), "--max-rollbacks 2", advice)


def test_rollback_points_are_copies_and_the_limit_stops_the_run():
    healer = Healer(settings(max_rollbacks=1), ckpt_every=2)
    weights = {"w": torch.zeros(3)}
    checkpoint = TrainCheckpoint(model=weights, ema=weights, opt={"state": {0: {"exp_avg": torch.zeros(3)}}},
                                 settings={}, model_config={}, train_steps=2, epoch=0, epoch_step=2)
    healer.keep(checkpoint)
    assert not healer.skips(0, 2, 3) and not healer.skips(0, 3, 4)
    weights["w"].fill_(float("nan"))  # the live weights diverge after the point was kept
    restored = healer.roll_back(TrainingDiverged("the loss became non-finite (nan) at step 4", 4), logging.getLogger("t"))
    assert torch.equal(restored.model["w"], torch.zeros(3)) and healer.skips(0, 3, 4)
    restored.opt["state"][0]["exp_avg"].fill_(1.0)  # an optimizer updating what it loaded leaves the point alone
    assert torch.equal(healer.point.opt["state"][0]["exp_avg"], torch.zeros(3))
    assert healer.state_dict()["skipped_batches"] == [[0, 3]]
    with pytest.raises(TrainingDiverged, match=r"step 5.*--max-rollbacks 1"):
        healer.roll_back(TrainingDiverged("the loss became non-finite (nan) at step 5", 5), logging.getLogger("t"))


#################################################################################
#                      Real runs: 2 processes, a corrupted batch                #
#################################################################################

def index_at(position: tuple[int, int], rank: int = 0) -> int:
    """The first latent that rank `rank` reads in the batch at (epoch, batch) (ResumableDistributedSampler)."""
    sampler = ResumableDistributedSampler(range(NUM_LATENTS), num_replicas=2, rank=rank, shuffle=True, seed=0)
    sampler.set_epoch(position[0])
    return list(sampler)[position[1] * GLOBAL_BATCH // 2]


def write_features(path: str) -> str:
    """64 cached 4x4x4 latents; the one of NAN_BATCH is NaN, the one of SPIKE_BATCH 300 times too large."""

    def corrupt(mean: np.ndarray) -> None:
        mean[index_at(NAN_BATCH)] = np.nan
        mean[index_at(SPIKE_BATCH, rank=1)] *= 300.0

    return write_cached_latents(path, NUM_LATENTS, corrupt)


def healing_args(root, results: str, *more: str) -> list:
    return ["--feature-path", str(root / "features"), *TINY, "--results-dir", str(root / results),
            "--global-batch-size", str(GLOBAL_BATCH), "--log-every", "4", "--ckpt-every", "4",
            "--sample-every", "100000", "--num-workers", "0", "--max-steps", "16", *more]


@pytest.fixture(scope="module")
def healed_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("healing")
    write_features(str(root / "features"))
    skip = f"{NAN_BATCH[0]}:{NAN_BATCH[1]},{SPIKE_BATCH[0]}:{SPIKE_BATCH[1]}"
    healed = run_train(healing_args(root, "healed", *HEALING), str(root), nproc=2)
    told = run_train(healing_args(root, "told", "--skip-batches", skip), str(root), nproc=2)
    assert_ok(healed)
    assert_ok(told)
    return dict(root=root, healed=healed, told=told, healed_dir=only_experiment(root / "healed"),
                told_dir=only_experiment(root / "told"))


def assert_same_training_state(first: dict, second: dict) -> None:
    for key in ("model", "ema"):
        for name in first[key]:
            assert torch.equal(first[key][name], second[key][name]), f"{key}.{name} differs"
    for index, state in first["opt"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, second["opt"]["state"][index][name]), f"opt state {index}.{name} differs"
    assert (first["train_steps"], first["epoch"], first["epoch_step"]) == (second["train_steps"], second["epoch"],
                                                                        second["epoch_step"])


@pytest.mark.slow
def test_a_nan_and_a_spike_roll_back_and_end_as_a_run_that_skipped_their_batches(healed_runs):
    checkpoints = ["0000004.pt", "0000008.pt", "0000012.pt", "0000016.pt"]
    for experiment in (healed_runs["healed_dir"], healed_runs["told_dir"]):
        assert sorted(os.listdir(os.path.join(experiment, "checkpoints"))) == checkpoints  # no checkpoint lost
    healed = load(os.path.join(healed_runs["healed_dir"], "checkpoints", "0000016.pt"))
    told = load(os.path.join(healed_runs["told_dir"], "checkpoints", "0000016.pt"))
    assert_same_training_state(healed, told)
    assert (healed["epoch"], healed["epoch_step"]) == (1, 2)  # 16 steps + 2 skipped batches of 16 an epoch
    assert healed["healing"]["skipped_batches"] == told["healing"]["skipped_batches"] == [list(NAN_BATCH),
                                                                                          list(SPIKE_BATCH)]
    nan, spike = healed["healing"]["rollbacks"]
    assert (nan["step"], nan["restored_step"], nan["skipped_batch"]) == (5, 4, list(NAN_BATCH))
    assert nan["reason"] == "the loss became non-finite (nan) at step 5"
    assert (spike["step"], spike["restored_step"], spike["skipped_batch"]) == (12, 10, list(SPIKE_BATCH))
    assert spike["reason"].startswith("the loss spiked to ") and "at step 12 (above 3.0 x the median at the last good state" in spike["reason"]
    log = healed_runs["healed"].stdout
    assert ("warning: rollback 1 of 2: the loss became non-finite (nan) at step 5; restoring step 4 (epoch 0, batch 4), "
            "skipping batch 4 of epoch 0 (the data of step 5)") in log
    assert "warning: rollback 2 of 2: the loss spiked to " in log
    healed_losses = logged_losses(os.path.join(healed_runs["healed_dir"], "log.txt"))
    told_losses = logged_losses(os.path.join(healed_runs["told_dir"], "log.txt"))
    # a log line averages the steps since the last one, or since the rollback point (10, for step 12's)
    assert {step: healed_losses[step] for step in (4, 8, 16)} == {step: told_losses[step] for step in (4, 8, 16)}


@pytest.mark.slow
def test_past_max_rollbacks_the_run_stops_with_exit_1_keeping_the_last_good_checkpoint(healed_runs):
    root = healed_runs["root"]
    result = run_train(healing_args(root, "limited", *HEALING[2:], "--max-rollbacks", "1"), str(root), nproc=2)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1 and "step 12" in lines[0] and "--max-rollbacks 1" in lines[0], lines
    experiment = only_experiment(root / "limited")
    assert sorted(os.listdir(os.path.join(experiment, "checkpoints"))) == ["0000004.pt", "0000008.pt"]
    assert_same_training_state(load(os.path.join(experiment, "checkpoints", "0000008.pt")),
                               load(os.path.join(healed_runs["told_dir"], "checkpoints", "0000008.pt")))


@pytest.mark.slow
def test_a_healed_run_resumes_exactly(healed_runs, tmp_path):
    """Resumed at step 8 (after the NaN's rollback), the run meets the spike again and ends the same."""
    experiment = str(tmp_path / "resumed")
    shutil.copytree(healed_runs["healed_dir"], experiment)
    for name in ("0000012.pt", "0000016.pt"):
        os.remove(os.path.join(experiment, "checkpoints", name))
    result = run_train(["--feature-path", str(healed_runs["root"] / "features"), "--resume", experiment, *HEALING,
                        "--log-every", "4", "--ckpt-every", "4", "--num-workers", "0", "--max-steps", "16"],
                       str(healed_runs["root"]), nproc=2)
    assert_ok(result)
    assert "warning: rollback 2 of 2: the loss spiked to " in result.stdout
    assert_same_training_state(load(os.path.join(experiment, "checkpoints", "0000016.pt")),
                               load(os.path.join(healed_runs["healed_dir"], "checkpoints", "0000016.pt")))


def write_token_features(path: str, nan_batch: tuple[int, int], batch_size: int) -> str:
    """16 cached 4x4x4 latents with REPA tokens (4 tokens of 8 dims: the tiny SiT's 2 x 2 grid) for one
    process; the latent of nan_batch is NaN."""
    count = 16
    os.makedirs(path)
    meta = dict(image_size=32, vae="ema", num_images=count, classes=["a", "b"], dtype="float32", block_size=count,
                latent_shape=[4, 4, 4], data_path="/nowhere", complete=True, repa_encoder="tiny-test-encoder",
                repa_tokens_shape=[4, 8])
    mean, std, labels = open_arrays(path, meta, "w+")
    tokens = open_token_array(path, meta, "w+")
    generator = np.random.default_rng(0)
    mean[:] = generator.normal(size=mean.shape).astype(np.float32)
    tokens[:] = generator.normal(size=tokens.shape).astype(np.float32)
    std[:], labels[:] = 0.1, np.arange(count) % 2
    sampler = ResumableDistributedSampler(range(count), num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(nan_batch[0])
    mean[list(sampler)[nan_batch[1] * batch_size]] = np.nan
    for array in (mean, std, labels, tokens):
        array.flush()
    write_meta(path, meta)
    return path


@pytest.mark.slow
def test_a_rollback_keeps_representation_alignment(tmp_path):
    """A REPA run that rolls back goes on aligning, from the rollback point's projector: it ends as a run
    told to skip the batch (model, EMA and projector bit for bit), and logs the alignment loss throughout."""
    nan_batch = (0, 2)  # the data of step 3; the rollback point is step 2
    write_token_features(str(tmp_path / "features"), nan_batch, batch_size=2)
    common = ["--feature-path", str(tmp_path / "features"), *TINY, "--global-batch-size", "2", "--log-every", "1",
              "--ckpt-every", "100000", "--sample-every", "100000", "--num-workers", "0", "--max-steps", "5",
              "--repa-encoder", "tiny-test-encoder", "--repa-depth", "1", "--repa-projector-dim", "16"]
    healed = run_train([*common, "--results-dir", str(tmp_path / "healed"), "--max-rollbacks", "1",
                        "--rollback-every", "2"], str(tmp_path))
    told = run_train([*common, "--results-dir", str(tmp_path / "told"), "--skip-batches", "0:2"], str(tmp_path))
    assert_ok(healed)
    assert_ok(told)
    assert re.search(r"warning: rollback 1 of 1: the .* became non-finite \(nan\) at step 3", healed.stdout)
    final = [load(os.path.join(only_experiment(tmp_path / run), "checkpoints", "0000005.pt")) for run in ("healed", "told")]
    assert_same_training_state(*final)
    for name, tensor in final[1]["extras"]["repa"].items():
        assert torch.equal(final[0]["extras"]["repa"][name], tensor), f"the repa term's {name} differs"
    with open(os.path.join(only_experiment(tmp_path / "healed"), "log.txt")) as handle:
        lines = [line for line in handle if "Train Loss" in line and "(first step" not in line]
    assert lines and all(", Align Loss: " in line for line in lines)


def test_skip_batches_outside_the_data_are_refused(tmp_path):
    """4 images in batches of 2: an epoch has batches 0 and 1; 0:999 would skip nothing, silently."""
    import train
    from conftest import make_image_folder

    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=16)
    argv = ["--data-path", data, "--vae", "none", "--image-size", "16", "--num-classes", "2", "--global-batch-size",
            "2", "--results-dir", str(tmp_path / "results"), "--num-workers", "0", "--max-steps", "1"]
    with pytest.raises(UsageError) as error:
        train.main([*argv, "--skip-batches", "0:1,0:999"])
    assert_names(error.value, "--skip-batches 0:999", "0..1")
    assert not os.path.exists(tmp_path / "results")
    settings(skip_batches=((1, 1),)).check_data(batches_per_epoch=2, epochs=3)  # inside: fine
