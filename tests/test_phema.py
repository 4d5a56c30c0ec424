"""Post-hoc EMA (sit.training.phema, sit.training.reconstruction, reconstruct_ema.py): the tracked
power-function EMA weights each step by its profile's integral, a reconstruction from snapshots
equals a directly tracked EMA (of another std, and the traditional constant-decay EMA) within 1e-3,
a real tiny run's snapshots resume exactly and reconstruct into a checkpoint that sample.py takes."""
import argparse
import glob
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_names
import reconstruct_ema
import sample
from sit.errors import UsageError
from sit.files import step_files
from sit.training.optimizer import update_ema
from sit.training.phema import (MAX_STD, PowerEMATracker, snapshot_path, std_list, std_to_exponent,
                                write_snapshot)
from sit.training.reconstruction import EMATarget, plan_reconstruction, solve_coefficients, write_reconstruction
from test_train import TINY, assert_ok, load, run_train


def exponent_to_std(gamma: float) -> float:
    """The relative standard deviation of the power-function profile of exponent gamma."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


class Toy(torch.nn.Module):
    """One parameter vector standing in for a network (with the `config` snapshots store)."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(size, dtype=torch.float64))
        self.config = {"size": size}


def test_std_and_exponent_are_each_others_inverse():
    for gamma in (0.5, 6.94, 16.97, 100.0, 2000.0):
        assert std_to_exponent(exponent_to_std(gamma)) == pytest.approx(gamma, rel=1e-9)
    assert exponent_to_std(0.0) == pytest.approx(MAX_STD)
    assert (std_to_exponent(0.05), std_to_exponent(0.10)) == pytest.approx((16.9722, 6.9372), abs=1e-4)  # the paper.s
    for bad in ("0.3", "0", "-0.1", "0.05,0.05", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            std_list(bad)


def test_the_tracked_ema_weights_each_step_by_its_profiles_integral():
    """Steps' weights set to one-hot vectors: the EMA after T steps is the weight of each step,
    (j^(g+1) - (j-1)^(g+1)) / T^(g+1) for j = 1..T."""
    steps = 50
    model = Toy(steps)
    tracker = PowerEMATracker(model, [0.05, 0.15])
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.weight.zero_()
            model.weight[step - 1] = 1.0
        tracker.update(model, step)
    j = np.arange(1, steps + 1, dtype=np.float64)
    for gamma, (weights,) in zip(tracker.exponents, tracker.averages):
        expected = (j ** (gamma + 1) - (j - 1) ** (gamma + 1)) / steps ** (gamma + 1)
        np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-12, atol=1e-15)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """600 steps of a random walk in 64 dimensions: snapshots of stds 0.05 and 0.10 every 10 steps, and
    directly tracked EMAs: power-function std 0.075 and traditional decay 0.99 (from the initial weights)."""
    folder = tmp_path_factory.mktemp("toy") / "phema"
    generator = torch.Generator().manual_seed(0)
    model = Toy(64)
    with torch.no_grad():
        model.weight.normal_(generator=generator)
    snapshots = PowerEMATracker(model, [0.05, 0.10])
    direct = PowerEMATracker(model, [0.075])
    traditional = Toy(64)
    traditional.load_state_dict(model.state_dict())
    write_snapshot(str(folder / "0000000.pt"), 0, snapshots, model, {"run": "toy"})  # as train.py: the initial weights
    for step in range(1, 601):
        with torch.no_grad():
            model.weight.add_(torch.randn(64, generator=generator, dtype=torch.float64))
        snapshots.update(model, step)
        direct.update(model, step)
        update_ema(traditional, model, decay=0.99)
        if step % 10 == 0:
            write_snapshot(str(folder / f"{step:07d}.pt"), step, snapshots, model, {"run": "toy"})
    return dict(folder=str(folder), direct=direct.averages[0][0], traditional=traditional.weight.detach().clone(),
                model=model)


def reconstructed(folder: str, target: EMATarget, path: str) -> torch.Tensor:
    write_reconstruction(plan_reconstruction(folder, target), path)
    return torch.load(path, weights_only=True)["ema"]["weight"].double()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_a_reconstructed_ema_equals_the_directly_tracked_one(toy_run, tmp_path):
    got = reconstructed(toy_run["folder"], EMATarget(std=0.075), str(tmp_path / "std.pt"))
    assert relative_error(got, toy_run["direct"]) < 1e-3
    # far closer than the two tracked lengths are to each other: the fit is not just "an EMA"
    newest = torch.load(os.path.join(toy_run["folder"], "0000600.pt"), weights_only=True)["emas"]
    assert relative_error(newest[0]["weight"].double(), toy_run["direct"]) > 100 * relative_error(got, toy_run["direct"])


def test_the_traditional_ema_is_reconstructed_too(toy_run, tmp_path):
    """decay 0.99 over 600 steps gives the initial weights 0.99^600 = 0.0024 of the average: step 0's snapshot."""
    got = reconstructed(toy_run["folder"], EMATarget(decay=0.99), str(tmp_path / "decay.pt"))
    assert relative_error(got, toy_run["traditional"]) < 1e-3
    plan = plan_reconstruction(toy_run["folder"], EMATarget(decay=0.99))
    assert plan.terms[-1] == (len(plan.files) - 1, 0, pytest.approx(0.99 ** 600)) and plan.files[-1].endswith("0000000.pt")
    assert plan.missing_share == 0 and plan.residual < 1e-2
    without_initial = tmp_path / "phema"
    shutil.copytree(toy_run["folder"], without_initial)
    os.remove(without_initial / "0000000.pt")
    assert plan_reconstruction(str(without_initial), EMATarget(decay=0.99)).missing_share == pytest.approx(0.99 ** 600)
    assert relative_error(reconstructed(str(without_initial), EMATarget(decay=0.99), str(tmp_path / "without.pt")),
                          toy_run["traditional"]) > 1e-3  # the initial weights' share is missing


def test_the_coefficients_reproduce_a_snapshot_exactly_and_sum_to_one():
    steps, stds = [100, 100, 200, 200], [0.05, 0.10, 0.05, 0.10]
    weights, residual = solve_coefficients(steps, stds, EMATarget(std=0.10), 200)
    np.testing.assert_allclose(weights, [0, 0, 0, 1], atol=1e-9)
    assert residual < 1e-6 and weights.sum() == pytest.approx(1.0)


def test_reconstruct_ema_bad_inputs_are_one_line(toy_run, tmp_path):
    with pytest.raises(UsageError) as error:
        reconstruct_ema.main([toy_run["folder"]])
    assert_names(error.value, "--std", "--ema-decay")
    with pytest.raises(UsageError) as error:
        reconstruct_ema.main([toy_run["folder"], "--std", "0.1", "--step", "35"])
    assert_names(error.value, "--step 35", toy_run["folder"], "10, 20")  # the steps there are
    with pytest.raises(UsageError) as error:
        reconstruct_ema.main([str(tmp_path), "--std", "0.1"])
    assert_names(error.value, str(tmp_path), "post-hoc")
    only_initial = tmp_path / "initial"
    only_initial.mkdir()
    shutil.copy(os.path.join(toy_run["folder"], "0000000.pt"), only_initial)
    with pytest.raises(UsageError) as error:
        reconstruct_ema.main([str(only_initial), "--std", "0.1"])
    assert_names(error.value, str(only_initial), "step 0")


def copy_of(toy_run, tmp_path) -> str:
    folder = str(tmp_path / "phema")
    shutil.copytree(toy_run["folder"], folder)
    return folder


def test_a_snapshot_that_is_no_regular_file_is_refused_without_reading_it(toy_run, tmp_path):
    folder = copy_of(toy_run, tmp_path)
    os.remove(os.path.join(folder, "0000300.pt"))
    os.mkfifo(os.path.join(folder, "0000300.pt"))  # reading it would wait for a writer forever
    with pytest.raises(UsageError) as error:
        reconstruct_ema.main([folder, "--std", "0.075"])
    assert_names(error.value, os.path.join(folder, "0000300.pt"), "regular file")


def test_another_runs_snapshot_is_refused(toy_run, tmp_path):
    """The newest snapshot replaced by one of another run of the same model: its EMA is no EMA of this run."""
    folder = copy_of(toy_run, tmp_path)
    stranger = PowerEMATracker(toy_run["model"], [0.05, 0.10])
    assert stranger.run_id != torch.load(os.path.join(folder, "0000600.pt"), weights_only=True)["run_id"]
    write_snapshot(os.path.join(folder, "0000590.pt"), 590, stranger, toy_run["model"], {"run": "other"})
    with pytest.raises(UsageError) as error:
        reconstruct_ema.main([folder, "--std", "0.075"])
    assert_names(error.value, os.path.join(folder, "0000590.pt"), "another run")


def test_a_snapshot_of_another_shape_is_refused(toy_run, tmp_path):
    folder = copy_of(toy_run, tmp_path)
    path = os.path.join(folder, "0000100.pt")
    snapshot = torch.load(path, weights_only=True)
    snapshot["emas"] = [{"weight": ema["weight"][:32]} for ema in snapshot["emas"]]
    torch.save(snapshot, path)
    with pytest.raises(UsageError) as error:
        reconstruct_ema.main([folder, "--std", "0.075"])
    assert_names(error.value, path, "shape")


def test_a_non_finite_snapshot_is_refused(toy_run, tmp_path):
    folder = copy_of(toy_run, tmp_path)
    path = os.path.join(folder, "0000500.pt")
    snapshot = torch.load(path, weights_only=True)
    snapshot["emas"][1]["weight"][3] = float("nan")
    torch.save(snapshot, path)
    with pytest.raises(UsageError) as error:
        reconstruct_ema.main([folder, "--std", "0.075", "--out-dir", str(tmp_path / "out")])
    assert_names(error.value, path, "NaN")
    assert not os.path.exists(tmp_path / "out" / "0000600-std-0.075.pt")


def test_a_killed_reconstructions_temporaries_are_removed(toy_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    from sit.files import this_host

    left = out / f".tmp-999999999@{this_host()}~abcdefgh.pt"  # a killed run's on this host (no such process)
    left.write_bytes(b"half a checkpoint")
    reconstruct_ema.main([toy_run["folder"], "--std", "0.075", "--out-dir", str(out)])
    assert sorted(os.listdir(out)) == ["0000600-std-0.075.pt"]
    assert "removed 1 unfinished files" in capsys.readouterr().out


def test_an_ema_the_snapshots_cannot_express_is_refused_and_a_poor_fit_warned(toy_run, tmp_path, capsys):
    """Snapshots every 10 steps cannot build an EMA of ~2 steps (decay 0.5): refused with the residual;
    a std of 0.01 (far below the tracked 0.05) fits to some percent: built, with a warning."""
    with pytest.raises(UsageError) as error:
        reconstruct_ema.main([toy_run["folder"], "--ema-decay", "0.5", "--out-dir", str(tmp_path)])
    assert_names(error.value, "--ema-decay 0.5", "limit 25%")
    assert not os.listdir(tmp_path)
    plan = plan_reconstruction(toy_run["folder"], EMATarget(std=0.01))
    assert reconstruct_ema.RESIDUAL_WARNING < plan.residual < reconstruct_ema.RESIDUAL_LIMIT
    reconstruct_ema.main([toy_run["folder"], "--std", "0.01", "--out-dir", str(tmp_path)])
    assert "warning: std-0.010: the snapshots fit its profile only to" in capsys.readouterr().err


#################################################################################
#                           A real tiny training run                            #
#################################################################################

@pytest.fixture(scope="module")
def phema_runs(tmp_path_factory):
    """6 steps straight vs 4 + --resume to 6, tracking stds 0.05 and 0.10 with snapshots every 2 steps."""
    from conftest import make_image_folder, make_tiny_vae

    root = tmp_path_factory.mktemp("phema_train")
    make_tiny_vae(str(root / "vae"))
    make_image_folder(str(root / "data"), num_classes=2, per_class=4, size=32)

    def args(results: str, *more: str) -> list:
        return ["--data-path", str(root / "data"), "--vae", str(root / "vae"), *TINY, "--results-dir", str(root / results),
                "--global-batch-size", "4", "--num-workers", "0", "--sample-every", "100000", "--ckpt-every", "100000",
                "--phema-stds", "0.050,0.100", "--phema-every", "2", *more]

    straight = run_train(args("straight", "--max-steps", "6"), str(root))
    first = run_train(args("interrupted", "--max-steps", "3"), str(root))
    assert_ok(straight)
    assert_ok(first)
    resumed = run_train(["--data-path", str(root / "data"), "--results-dir", str(root / "interrupted"), "--resume",
                         "--max-steps", "6", "--num-workers", "0", "--ckpt-every", "100000"], str(root))
    assert_ok(resumed)
    (straight_dir,) = glob.glob(str(root / "straight" / "*"))
    (interrupted_dir,) = glob.glob(str(root / "interrupted" / "*"))
    return dict(root=root, straight=straight_dir, interrupted=interrupted_dir, args=args)


@pytest.mark.slow
def test_snapshots_resume_exactly(phema_runs):
    straight, interrupted = phema_runs["straight"], phema_runs["interrupted"]
    assert [step for step, _ in step_files(os.path.join(straight, "phema"))] == [0, 2, 4, 6]
    assert [step for step, _ in step_files(os.path.join(interrupted, "phema"))] == [0, 2, 3, 4, 6]  # 3: the first run's end
    checkpoint = load(os.path.join(interrupted, "checkpoints", "0000003.pt"))
    assert checkpoint["phema"]["stds"] == [0.05, 0.1] and set(checkpoint["phema"]["emas"][0]) == set(checkpoint["model"])
    for step in (0, 4, 6):
        one, other = (load(snapshot_path(folder, step)) for folder in (straight, interrupted))
        assert one["stds"] == other["stds"] == [0.05, 0.1] and one["step"] == step
        assert one["run_id"] == load(snapshot_path(straight, 2))["run_id"]  # one id for the whole run
        assert other["run_id"] == checkpoint["phema"]["run_id"]  # kept across the resume
        for first, second in zip(one["emas"], other["emas"]):
            assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.slow
def test_a_reconstruction_from_a_real_run_samples_with_sample_py(phema_runs, tmp_path):
    reconstruct_ema.main([phema_runs["straight"], "--std", "0.080", "--ema-decay", "0.9999"])
    outputs = sorted(glob.glob(os.path.join(phema_runs["straight"], "reconstructed", "*.pt")))
    assert [os.path.basename(path) for path in outputs] == ["0000006-decay-0.9999.pt", "0000006-std-0.080.pt"]
    for path in outputs:
        sample.main(["ODE", "--ckpt", path, "--class-labels", "0,1", "--sampling-method", "euler",
                     "--num-sampling-steps", "4", "--output", str(tmp_path / "grid.png")])
        assert Image.open(tmp_path / "grid.png").size == (2 * 34 + 2, 36)  # the checkpoint's size, VAE and classes
    stored = torch.load(outputs[1], weights_only=True)
    assert stored["phema"]["std"] == 0.08 and stored["phema"]["snapshot_steps"] == [2, 4, 6]
    assert torch.load(outputs[0], weights_only=True)["phema"]["snapshot_steps"] == [0, 2, 4, 6]
    assert stored["model_config"]["hidden_size"] == 32 and stored["args"]["phema_stds"] == (0.05, 0.1)


@pytest.mark.slow
def test_resume_refuses_other_stds_or_starting_them_mid_run(phema_runs, tmp_path):
    import train

    root = phema_runs["root"]
    with pytest.raises(UsageError) as error:
        train.main(["--data-path", str(root / "data"), "--resume", phema_runs["straight"], "--phema-stds", "0.2"])
    assert_names(error.value, "--phema-stds (0.2,)", "(0.05, 0.1)")
    run = run_train(["--data-path", str(root / "data"), "--vae", str(root / "vae"), *TINY, "--results-dir",
                     str(root / "plain"), "--global-batch-size", "4", "--num-workers", "0", "--max-steps", "1"], str(root))
    assert_ok(run)
    (plain,) = glob.glob(str(root / "plain" / "*" / "checkpoints" / "0000001.pt"))
    with pytest.raises(UsageError) as error:
        train.main(["--data-path", str(root / "data"), "--resume", plain, "--phema-stds", "0.1"])
    assert_names(error.value, "--phema-stds None", "step 0")
    older = load(plain)
    del older["args"]["phema_stds"], older["args"]["phema_every"]  # a checkpoint from before post-hoc EMA
    torch.save(older, tmp_path / "older.pt")
    with pytest.raises(UsageError) as error:
        train.main(["--data-path", str(root / "data"), "--ckpt", str(tmp_path / "older.pt"), "--phema-stds", "0.1"])
    assert_names(error.value, "--phema-stds", "step 1")
