"""train.py, run for real (subprocess, torchrun) on a tiny image folder, tiny VAE and tiny SiT.

Proves: a 2-process Gloo run (log, checkpoint contents, sample grid), resume == uninterrupted
(bitwise weights and equal logged losses), SIGTERM -> checkpoint + exit 0, wandb offline run id
reuse, a non-finite loss stopping with the last good checkpoint kept, and every bad input ending
with a one-line message before heavy work.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from conftest import REPO, assert_names, make_image_folder, make_tiny_vae
from sit.errors import RunFailure, UsageError

TRAIN = os.path.join(REPO, "train.py")
TINY_CONFIG = {"depth": 1, "hidden_size": 32, "num_heads": 2}
TINY = ["--model", "SiT-S/2", "--model-config", json.dumps(TINY_CONFIG), "--image-size", "32", "--num-classes", "2"]
QUIET = ["--ckpt-every", "100000", "--sample-every", "100000"]
LOSS_LINE = re.compile(r"\(step=(\d{7})\) Train Loss: ([0-9.]+|nan|inf)")


def load(path: str) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def env_for_runs() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train_command(args: list, nproc: int = 1) -> list:
    if nproc == 1:
        return [sys.executable, TRAIN, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN, *args]


def start(args: list, cwd: str, nproc: int = 1) -> subprocess.Popen:
    return subprocess.Popen(train_command(args, nproc), cwd=cwd, env=env_for_runs(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_train(args: list, cwd: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return finish(start(args, cwd, nproc))


def logged_losses(log_path: str) -> dict:
    with open(log_path) as handle:
        return {int(step): loss for step, loss in LOSS_LINE.findall(handle.read())}


def only_experiment(results_dir: str) -> str:
    (name,) = os.listdir(results_dir)
    return os.path.join(results_dir, name)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny VAE and 2 classes x 4 images (some not square) plus one unreadable file: 9 files."""
    root = tmp_path_factory.mktemp("train")
    make_tiny_vae(str(root / "vae"))
    make_image_folder(str(root / "data"), num_classes=2, per_class=4, size=32)
    (root / "data" / "class0" / "broken.png").write_bytes(b"this is not a PNG")
    return root


def common_args(workspace, results: str, *more: str) -> list:
    return ["--data-path", str(workspace / "data"), "--vae", str(workspace / "vae"), *TINY,
            "--results-dir", str(workspace / results), "--global-batch-size", "3", "--log-every", "1", *more]


@pytest.fixture(scope="module")
def single_runs(workspace):
    """6 steps straight (2 workers) vs 4 steps + --resume to 6 (no workers); 9 files / batch 3 = 3 steps an epoch,
    so the interruption falls mid-epoch (epoch 1, batch 1)."""
    straight = start(common_args(workspace, "straight", "--max-steps", "6", "--num-workers", "2", *QUIET), str(workspace))
    first = start(common_args(workspace, "interrupted", "--max-steps", "4", "--num-workers", "0", *QUIET), str(workspace))
    straight, first = finish(straight), finish(first)
    assert_ok(straight)
    assert_ok(first)
    resumed = run_train(["--data-path", str(workspace / "data"), "--results-dir", str(workspace / "interrupted"),
                         "--resume", "--max-steps", "6", "--log-every", "1", "--num-workers", "0", *QUIET], str(workspace))
    assert_ok(resumed)
    return dict(straight=straight, first=first, resumed=resumed, straight_dir=only_experiment(workspace / "straight"),
                interrupted_dir=only_experiment(workspace / "interrupted"))


@pytest.mark.slow
def test_resume_continues_exactly_like_an_uninterrupted_run(single_runs):
    straight = load(os.path.join(single_runs["straight_dir"], "checkpoints", "0000006.pt"))
    interrupted_dir = single_runs["interrupted_dir"]
    assert sorted(os.listdir(os.path.join(interrupted_dir, "checkpoints"))) == ["0000004.pt", "0000006.pt"]
    middle = load(os.path.join(interrupted_dir, "checkpoints", "0000004.pt"))
    assert (middle["train_steps"], middle["epoch"], middle["epoch_step"]) == (4, 1, 1)
    resumed = load(os.path.join(interrupted_dir, "checkpoints", "0000006.pt"))
    assert (resumed["train_steps"], resumed["epoch"], resumed["epoch_step"]) == (6, 1, 3)
    for key in ("model", "ema"):
        assert straight[key].keys() == resumed[key].keys()
        for name in straight[key]:
            assert torch.equal(straight[key][name], resumed[key][name]), f"{key}.{name} differs"
    for index, state in straight["opt"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, resumed["opt"]["state"][index][name]), f"opt state {index}.{name} differs"
    straight_losses = logged_losses(os.path.join(single_runs["straight_dir"], "log.txt"))
    resumed_losses = logged_losses(os.path.join(interrupted_dir, "log.txt"))
    assert sorted(straight_losses) == sorted(resumed_losses) == [1, 2, 3, 4, 5, 6]
    assert straight_losses == resumed_losses
    assert "Resumed from" in single_runs["resumed"].stdout and "at step 4 (epoch 1, batch 1)" in single_runs["resumed"].stdout
    # The command line kept what it owns; the model settings came from the checkpoint.
    assert resumed["args"]["num_workers"] == 0 and resumed["args"]["max_steps"] == 6
    assert resumed["model_config"]["hidden_size"] == 32 and resumed["args"]["image_size"] == 32


@pytest.mark.slow
def test_unreadable_image_is_skipped_with_a_warning_naming_it(single_runs, workspace):
    broken = os.path.join(str(workspace / "data"), "class0", "broken.png")
    for key in ("straight", "first"):
        assert f"warning: skipping unreadable image {broken}" in single_runs[key].stderr
        assert single_runs[key].returncode == 0


@pytest.mark.slow
def test_resume_refuses_other_model_or_transport_settings(single_runs, workspace, capsys, monkeypatch):
    import train

    forbid_heavy_work(monkeypatch)
    experiment = single_runs["interrupted_dir"]
    base = ["--data-path", str(workspace / "data"), "--resume", experiment]
    for flag, value, stored in (("--model", "SiT-B/2", "SiT-S/2"), ("--prediction", "noise", "velocity"),
                                ("--image-size", "64", "32")):
        with pytest.raises(UsageError) as error:
            train.main(base + [flag, value])
        message = str(error.value)
        assert "\n" not in message
        assert f"{flag} {value} but the checkpoint" in message and f"{flag} {stored}" in message


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_0(single_runs, workspace, tmp_path):
    # Fine-tune from bare weights (no optimizer state): step 0, fresh optimizer.
    bare = tmp_path / "bare.pt"
    torch.save(load(os.path.join(single_runs["straight_dir"], "checkpoints", "0000006.pt"))["ema"], bare)
    process = start(common_args(workspace, "sigterm", "--ckpt", str(bare), "--max-steps", "100000",
                                "--num-workers", "0", *QUIET), str(workspace))
    deadline = time.time() + 120
    seen = []
    for line in process.stdout:  # wait for the first step's log line
        seen.append(line)
        if "(step=" in line:
            process.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "no log line"
    result = finish(process)
    assert_ok(result)
    stdout = "".join(seen) + result.stdout
    stopped_at = int(re.search(r"stopping at step (\d+)", stdout).group(1))
    experiment = only_experiment(workspace / "sigterm")
    assert os.listdir(os.path.join(experiment, "checkpoints")) == [f"{stopped_at:07d}.pt"]
    checkpoint = load(os.path.join(experiment, "checkpoints", f"{stopped_at:07d}.pt"))
    assert checkpoint["train_steps"] == stopped_at >= 1
    assert "Fine-tuning the weights of" in stdout and "Received SIGTERM" in stdout


@pytest.mark.slow
def test_non_finite_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(single_runs, workspace, tmp_path):
    experiment = str(tmp_path / "poisoned")
    shutil.copytree(single_runs["interrupted_dir"], experiment)
    path = os.path.join(experiment, "checkpoints", "0000006.pt")
    checkpoint = load(path)
    for state in checkpoint["opt"]["state"].values():
        state["exp_avg"].fill_(float("nan"))  # step 7's update makes every weight NaN, so step 8's loss is NaN
    torch.save(checkpoint, path)
    before = os.path.getmtime(path)
    result = run_train(["--data-path", str(workspace / "data"), "--resume", experiment, "--max-steps", "10",
                        "--log-every", "1", "--ckpt-every", "2", "--num-workers", "0"], str(workspace))
    assert result.returncode == 1
    assert "train.py: error: the loss became non-finite (nan) at step 8" in result.stderr
    assert sorted(os.listdir(os.path.join(experiment, "checkpoints"))) == ["0000004.pt", "0000006.pt"]
    assert os.path.getmtime(path) == before


@pytest.fixture(scope="module")
def torchrun_runs(workspace):
    """2 processes (Gloo), 3 steps with --wandb offline, then --resume to step 4."""
    args = common_args(workspace, "ddp", "--global-batch-size", "4", "--max-steps", "3", "--sample-every", "2",
                       "--ckpt-every", "2", "--num-workers", "0", "--wandb")
    first = run_train(args, str(workspace), nproc=2)
    assert_ok(first)
    experiment = only_experiment(workspace / "ddp")
    resumed = run_train(["--data-path", str(workspace / "data"), "--resume", experiment, "--max-steps", "4",
                         "--log-every", "1", "--num-workers", "0", "--wandb"], str(workspace), nproc=2)
    assert_ok(resumed)
    return dict(first=first, resumed=resumed, experiment=experiment)


@pytest.mark.slow
def test_two_process_run_logs_and_writes_a_complete_checkpoint(torchrun_runs):
    experiment = torchrun_runs["experiment"]
    with open(os.path.join(experiment, "log.txt")) as handle:
        log = handle.read()
    first_line = log.splitlines()[0]
    assert "Configuration: " in first_line and '"world_size": 2' in first_line and '"global_batch_size": 4' in first_line
    assert sorted(logged_losses(os.path.join(experiment, "log.txt"))) == [1, 2, 3, 4]
    assert re.search(r"\(step=0000003\) Train Loss: \d+\.\d{4}, Train Steps/Sec: [\d.]+, Images/Sec: [\d.]+", log)
    checkpoint = load(os.path.join(experiment, "checkpoints", "0000003.pt"))
    assert {"model", "ema", "opt", "args", "train_steps", "epoch", "epoch_step", "rng", "model_config",
            "experiment_dir", "wandb_id"} <= set(checkpoint)
    # 9 files over 2 ranks: 5 each, local batch 2 -> 2 batches an epoch; step 3 is epoch 1, batch 1.
    assert (checkpoint["train_steps"], checkpoint["epoch"], checkpoint["epoch_step"]) == (3, 1, 1)
    assert isinstance(checkpoint["args"], dict) and checkpoint["args"]["global_batch_size"] == 4
    assert len(checkpoint["rng"]) == 2 and not torch.equal(checkpoint["rng"][0]["cpu"], checkpoint["rng"][1]["cpu"])
    assert checkpoint["model_config"] == dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1,
                                              num_heads=2, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=2,
                                              learn_sigma=True)
    assert sorted(checkpoint["model"]) == sorted(checkpoint["ema"])
    assert not any(name.startswith("module.") for name in checkpoint["model"])


@pytest.mark.slow
def test_two_process_run_saves_an_ema_sample_grid(torchrun_runs):
    path = os.path.join(torchrun_runs["experiment"], "samples", "0000002.png")
    with Image.open(path) as grid:
        assert grid.size == (4 * 32 + 5 * 2, 4 * 32 + 5 * 2)  # 16 images of 32 px, 4 a row, 2 px padding
        assert grid.mode == "RGB"


@pytest.mark.slow
def test_two_process_resume_and_wandb_run_id_reuse(torchrun_runs):
    experiment = torchrun_runs["experiment"]
    with open(os.path.join(experiment, "wandb_id.txt")) as handle:
        run_id = handle.read().strip()
    assert re.fullmatch(r"[0-9a-f]{16}", run_id)
    assert f"wandb run id: {run_id}" in torchrun_runs["first"].stdout
    assert f"wandb run id: {run_id}" in torchrun_runs["resumed"].stdout
    assert "at step 3 (epoch 1, batch 1)" in torchrun_runs["resumed"].stdout
    final = load(os.path.join(experiment, "checkpoints", "0000004.pt"))
    assert final["train_steps"] == 4 and final["wandb_id"] == run_id
    offline_runs = [name for name in os.listdir(os.path.join(experiment, "wandb")) if name.startswith("offline-run-")]
    assert len(offline_runs) == 2 and all(name.endswith(run_id) for name in offline_runs)


@pytest.mark.slow
def test_checkpoint_loads_for_sampling_without_extra_flags(torchrun_runs):
    from sit.checkpoint import load_model

    model, info = load_model(os.path.join(torchrun_runs["experiment"], "checkpoints", "0000004.pt"))
    assert (info["image_size"], info["num_classes"], info["in_channels"]) == (32, 2, 4)
    assert info["transport"]["path_type"] == "Linear" and info["transport"]["prediction"] == "velocity"
    assert model.config["hidden_size"] == 32


#################################################################################
#                 Bad input: one line, non-zero exit, before heavy work          #
#################################################################################

def forbid_heavy_work(monkeypatch) -> None:
    """Joining the job or loading a VAE fails the test: the checks must come before both."""
    import sit.training.decoder
    import sit.training.launch

    def heavy(*args, **kwargs):
        raise AssertionError("heavy work started before the input was checked")

    monkeypatch.setattr(sit.training.decoder, "load_latent_space", heavy)
    monkeypatch.setattr(sit.training.launch, "setup_distributed", heavy)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def tiny_data(tmp_path):
    return make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=1, size=16)


def bad_input_cases(tmp_path, tiny_data, vae_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "no_images"
    (no_images / "class0").mkdir(parents=True)
    (no_images / "class0" / "notes.txt").write_text("not an image")
    base = ["--data-path", tiny_data, "--vae", vae_dir, *TINY]
    return [
        ("missing data path", ["--data-path", str(tmp_path / "nowhere"), "--vae", vae_dir, *TINY], {}, "is not a folder"),
        ("empty data path", ["--data-path", str(empty), "--vae", vae_dir, *TINY], {}, "holds no class folders"),
        ("no images", ["--data-path", str(no_images), "--vae", vae_dir, *TINY], {}, "holds no images"),
        ("image size", base + ["--image-size", "36"], {}, "--image-size must be a multiple of 8 (the VAE downsamples by 8), got 36"),
        ("batch vs processes", base + ["--global-batch-size", "3"], {"RANK": "0", "WORLD_SIZE": "2"},
         "--global-batch-size 3 is not divisible by the 2 processes"),
        ("patch", ["--data-path", tiny_data, "--vae", vae_dir, "--model", "SiT-S/8", "--image-size", "32"], {},
         "not divisible by the patch size 8"),
        ("vae", ["--data-path", tiny_data, "--vae", str(tmp_path / "no_vae"), *TINY], {}, "nor a local diffusers folder"),
        ("model config", base + ["--model-config", '{"depthh": 1}'], {}, "unknown key(s) depthh"),
        ("model config json", base + ["--model-config", "{depth: 1}"], {}, "--model-config is not valid JSON"),
        ("classes", ["--data-path", tiny_data, "--vae", vae_dir, *TINY[:-2], "--num-classes", "1"], {},
         "has 2 class folders but --num-classes is 1"),
        ("resume nothing", base + ["--resume", "--results-dir", str(tmp_path / "no_results")], {},
         "no experiment with a checkpoint"),
        ("resume and ckpt", base + ["--resume", "x", "--ckpt", "y"], {}, "either --ckpt or --resume"),
        ("resume missing", base + ["--resume", str(tmp_path / "gone")], {}, "no such experiment folder or checkpoint"),
        ("ckpt missing", base + ["--ckpt", str(tmp_path / "gone.pt")], {}, "--ckpt: no SiT checkpoint at"),
        ("transport eps", base + ["--train-eps", "0.7"], {}, "--train-eps must be in [0, 0.5)"),
    ]


def test_bad_inputs_end_with_one_line_before_heavy_work(tmp_path, tiny_data, monkeypatch):
    import train

    forbid_heavy_work(monkeypatch)
    vae_dir = str(tmp_path / "vae")
    os.makedirs(vae_dir)  # the checks only need the folder; nothing may load it
    for name, argv, env, expected in bad_input_cases(tmp_path, tiny_data, vae_dir):
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            with pytest.raises(UsageError) as error:
                train.main(argv)
        message = str(error.value)
        assert "\n" not in message, (name, message)
        assert expected in message, (name, message)


@pytest.mark.parametrize("argv, expected", [
    ([], "one of the arguments --data-path --feature-path is required"),
    (["--data-path", "x", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--data-path", "x", "--model", "SiT-XXL/2"], "invalid choice: 'SiT-XXL/2'"),
    (["--data-path", "x", "--prediction", "velocit"], "invalid choice: 'velocit'"),
])
def test_command_line_errors_are_argparse_errors(argv, expected, capsys):
    import train

    with pytest.raises(SystemExit) as error:
        train.main(argv)
    assert error.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.slow
def test_real_process_exits_non_zero_with_one_line(workspace):
    result = run_train(["--data-path", str(workspace / "data"), "--vae", str(workspace / "vae"), *TINY,
                        "--image-size", "36"], str(workspace))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["train.py: error: --image-size must be a multiple of 8 "
                                                  "(the VAE downsamples by 8), got 36"]


def test_fid_guidance_without_label_dropout_is_a_bad_input(tmp_path, tiny_data, monkeypatch):
    import train

    forbid_heavy_work(monkeypatch)
    vae_dir = str(tmp_path / "vae")
    os.makedirs(vae_dir)
    no_dropout = json.dumps(dict(TINY_CONFIG, class_dropout_prob=0))
    argv = ["--data-path", tiny_data, "--vae", vae_dir, *TINY, "--model-config", no_dropout, "--fid-every", "5",
            "--fid-ref", os.path.join(tiny_data, "class0", "0.png"), "--fid-cfg-scale", "1.5"]  # any file as --fid-ref
    with pytest.raises(UsageError) as error:
        train.main(argv)
    assert str(error.value) == ("--fid-cfg-scale 1.5 needs a model with label dropout (its "
                                "null class), but class_dropout_prob is 0: use --fid-cfg-scale 1")


#################################################################################
#                       Resume: another --vae, unreadable newest                 #
#################################################################################

def resolve_against(argv: list, checkpoint: dict) -> tuple:
    """(TrainConfig, warnings) of train.py's flags resolved against a checkpoint named ckpt.pt."""
    import train
    from sit.checkpoint import settings_of
    from train_configs import resolve_train_config

    args, explicit = train.parse_args(argv)
    return resolve_train_config(vars(args), explicit, settings_of(checkpoint), source="the checkpoint ckpt.pt",
                                train_steps=checkpoint["train_steps"])


def test_resume_takes_another_vae_path_with_a_warning_but_never_switches_pixels_and_latents(tmp_path):
    moved = str(tmp_path / "moved_vae")
    os.makedirs(moved)
    checkpoint = {"args": argparse.Namespace(vae="/old/place/vae"), "train_steps": 4}
    config, warnings = resolve_against(["--data-path", "x", "--vae", moved], checkpoint)
    assert config.model.vae == moved
    assert warnings == [f"--vae {moved} replaces the checkpoint's /old/place/vae: fine for a copy of the same VAE "
                        f"(or ema/mse, which share the encoder); another encoder changes what the model learns"]
    config, warnings = resolve_against(["--data-path", "x"], checkpoint)
    assert warnings == [] and config.model.vae == "/old/place/vae"
    for given, held in (("none", "/old/place/vae"), ("ema", "none")):
        with pytest.raises(UsageError) as error:
            resolve_against(["--data-path", "x", "--vae", given], {"args": {"vae": held}, "train_steps": 4})
        assert str(error.value).startswith(f"--vae {given} but the checkpoint ckpt.pt was "
                                           f"trained with --vae {held}; a model learns either pixels")


def plan_in_process(argv: list):
    """What train.main(argv) would train: the checked plan, with its start point and warnings."""
    import train
    from sit.distributed import launched_world_size
    from sit.training.launch import plan_training

    args, explicit = train.parse_args(argv)
    return plan_training(vars(args), explicit, launched_world_size())


def test_resume_skips_an_unreadable_newest_checkpoint_unless_named(tmp_path, tiny_data, monkeypatch):
    import train

    forbid_heavy_work(monkeypatch)
    vae_dir = str(tmp_path / "vae")
    os.makedirs(vae_dir)
    common = ["--data-path", tiny_data, "--vae", vae_dir, *TINY, "--results-dir", str(tmp_path / "results")]
    folder = tmp_path / "results" / "000-SiT-S-2-Linear-velocity-None" / "checkpoints"
    os.makedirs(folder)
    stored = {"model": {}, "ema": {}, "opt": {}, "model_config": {}, "args": train.parse_args(common)[0]}
    for step in (2, 4):
        torch.save(dict(stored, train_steps=step), folder / f"{step:07d}.pt")
    truncated = str(folder / "0000004.pt")
    with open(truncated, "r+b") as handle:
        handle.truncate(os.path.getsize(truncated) // 2)
    for resume in (["--resume"], ["--resume", str(folder.parent)]):
        plan = plan_in_process(common + resume)
        assert plan.start.source == str(folder / "0000002.pt") and plan.start.checkpoint["train_steps"] == 2
        warnings = plan.warnings
        assert len(warnings) == 1 and warnings[0].startswith(f"skipped {truncated}: {truncated} is not a readable "
                                                             f"PyTorch checkpoint (truncated")
        assert warnings[0].endswith("; resuming from the checkpoint before it")
    for named in (["--resume", truncated], ["--ckpt", truncated]):
        with pytest.raises(UsageError) as error:
            train.main(common + named)
        assert_names(error.value, f"{named[0]}: {truncated}", "readable")


#################################################################################
#              Files: atomic, synced, umask; rank-0 write failures               #
#################################################################################

def test_atomic_write_syncs_before_renaming_and_gives_the_umask_permissions(tmp_path, monkeypatch):
    from sit.files import atomic_write

    events = []  # (call, real path) of os.fsync and os.replace, in order
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src: str, dst: str) -> None:
        events.append(("replace", os.path.realpath(src)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)

    def write(temporary: str) -> None:
        with open(temporary, "w") as handle:
            handle.write("data")

    path = str(tmp_path / "out.txt")
    umask = os.umask(0o027)
    try:
        atomic_write(path, write)
    finally:
        os.umask(umask)
    (first, synced), (second, renamed), folder = events
    assert (first, second) == ("fsync", "replace") and synced == renamed and os.path.basename(synced).startswith(".tmp-")
    assert folder == ("fsync", os.path.realpath(str(tmp_path)))  # the rename itself
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)
    with open(path) as handle:
        assert handle.read() == "data"


def rank_run(tmp_path, rank: int) -> object:
    """A sit.training.loop.TrainingRun with the parts that save_checkpoint and save_samples use, for `rank`
    of a 2-process job (no data, loader or stop signal)."""
    import logging
    from types import SimpleNamespace

    from models import SiT
    from sit.distributed import DistContext
    from sit.training.decoder import RunVAE
    from sit.training.loop import TrainingRun, TrainState
    from sit.training.monitor import LossMonitor
    from sit.training.step import TrainStep
    from transport import create_transport

    model = SiT(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=2)
    step = TrainStep.create(model, transport=create_transport(), device=torch.device("cpu"), lr=1e-4)
    config = SimpleNamespace(settings=lambda: {"model": "SiT-S/2"}, run=SimpleNamespace(cfg_scale=4.0))
    return TrainingRun(step=step, config=config, state=TrainState(3, 1, 0),
                       ctx=DistContext(rank, 2, rank, torch.device("cpu")),
                       experiment_dir=str(tmp_path) if rank == 0 else None, monitor=LossMonitor(1),
                       wandb_run=None, logger=logging.getLogger("test"), vae=RunVAE("none", torch.device("cpu")),
                       preview=None, dataset=None, loader=None, sampler=None, stop=None, term_factories=[])


def agreement_as_rank(monkeypatch, rank: int, reported: list, message: str = "") -> None:
    """sit.distributed's collectives as `rank` of a 2-process job in which rank 0 fails (with message):
    `reported` collects what this rank tells the others (whether it failed)."""
    import sit.distributed

    monkeypatch.setattr(sit.distributed, "any_rank", lambda failed, device, group=None: reported.append(failed) or True)
    monkeypatch.setattr(sit.distributed, "gather_objects", lambda report: [("run", message), report])


@pytest.mark.parametrize("what", ["checkpoint", "preview grid"])
def test_rank_0_write_failure_stops_every_rank_with_one_line(what, tmp_path, monkeypatch):
    import errno

    import sit.checkpoint
    import sit.training.loop

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if what == "checkpoint":
        monkeypatch.setattr(sit.checkpoint, "atomic_torch_save", no_space)
    else:
        monkeypatch.setattr(sit.training.loop, "save_preview", no_space)
    save = sit.training.loop.save_checkpoint if what == "checkpoint" else sit.training.loop.save_samples
    path = str(tmp_path / ("checkpoints/0000003.pt" if what == "checkpoint" else "samples/0000003.png"))
    expected = f"cannot write the {what} {path} ([Errno 28] No space left on device)"
    for rank in (0, 1):  # rank 0 fails to write; rank 1 learns it from the check (which here answers what rank 0 sent)
        reported = []
        agreement_as_rank(monkeypatch, rank, reported, expected)
        monkeypatch.setenv("RANK", str(rank))
        with pytest.raises(RunFailure) as error:
            save(rank_run(tmp_path, rank))
        assert reported == [rank == 0]
        assert str(error.value) == expected and error.value.exit_code == 1


def test_rank_0_write_failure_is_printed_once(tmp_path, monkeypatch, capsys):
    import errno

    import sit.checkpoint
    from sit.cli import run_main
    from sit.training.loop import save_checkpoint

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sit.checkpoint, "atomic_torch_save", no_space)
    expected = f"cannot write the checkpoint {tmp_path / 'checkpoints' / '0000003.pt'} ([Errno 28] No space left on device)"
    for rank in (0, 1):
        agreement_as_rank(monkeypatch, rank, [], expected)
        monkeypatch.setenv("RANK", str(rank))
        assert run_main(lambda: save_checkpoint(rank_run(tmp_path, rank)), "train.py") == 1
        assert capsys.readouterr().err == (f"train.py: error: {expected}\n" if rank == 0 else "")


def test_save_checkpoint_writes_and_every_rank_joins_the_check(tmp_path, monkeypatch):
    import sit.distributed
    from sit.training.loop import save_checkpoint

    reported = []
    monkeypatch.setattr(sit.distributed, "any_rank", lambda failed, device, group=None: reported.append(failed) or failed)
    run = rank_run(tmp_path, 0)
    save_checkpoint(run)
    assert reported == [False] and run.last_saved_step == 3
    checkpoint = load(str(tmp_path / "checkpoints" / "0000003.pt"))
    assert checkpoint["train_steps"] == 3 and checkpoint["args"] == {"model": "SiT-S/2"}


@pytest.mark.parametrize("flags, named", [
    (["--phema-every", "5"], ["--phema-every", "--phema-stds"]),
    (["--rollback-every", "5"], ["--rollback-every", "--max-rollbacks"]),
    (["--fid-steps", "5", "--fid-cfg-scale", "2"], ["--fid-steps", "--fid-cfg-scale", "--fid-every"]),
    (["--repa-coeff", "0.1"], ["--repa-coeff", "--repa-encoder"]),
])
def test_a_flag_that_would_do_nothing_without_another_is_refused(flags, named, tmp_path):
    """Decided from the settings' declarations (sit.declarations.Needs): one line naming every such flag
    given and the one it needs, before anything is made."""
    import train
    from conftest import assert_names

    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=1, size=16)
    with pytest.raises(UsageError) as error:
        train.main(["--data-path", data, "--vae", "none", "--image-size", "16", "--num-classes", "2",
                    "--results-dir", str(tmp_path / "results"), *flags])
    assert_names(str(error.value), *named)
    assert not os.path.exists(tmp_path / "results")


def test_the_hint_at_the_end_of_training_samples_the_model_as_printed(tmp_path, monkeypatch):
    """A 3-class model: the printed sample.py command names labels the model has (ImageNet's would not do)."""
    import re
    import shlex

    import sample
    import train

    monkeypatch.chdir(tmp_path)
    data = make_image_folder(str(tmp_path / "data"), num_classes=3, per_class=2, size=16)
    train.main(["--data-path", data, "--vae", "none", "--image-size", "16", "--num-classes", "3", "--global-batch-size",
                "2", "--max-steps", "2", "--num-workers", "0", "--model-config", json.dumps(TINY_CONFIG),
                "--sample-every", "1000"])
    with open(os.path.join(only_experiment(str(tmp_path / "results")), "log.txt")) as handle:
        (hint,) = re.findall(r"sample it with `(python sample\.py [^`]+)`", handle.read())
    argv = shlex.split(hint)[2:]
    assert argv[argv.index("--class-labels") + 1] == "0,1,2"
    sample.main([*argv, "--sampling-method", "euler", "--num-sampling-steps", "2"])
    assert Image.open(tmp_path / "sample.png").size == (3 * 16 + 4 * 2, 16 + 2 * 2)
