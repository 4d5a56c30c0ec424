"""sit.training.experiment and the first hour of a user: experiment folders named after the real model
shape, <experiment>/latest.txt, the first loss line after step 1, progress lines, and `--ckpt` given an
experiment or results folder (its newest checkpoint) in sample.py/sample_ddp.py."""
import contextlib
import io
import json
import os
import re

import pytest
import torch

import sample
import sample_ddp
import train
from conftest import make_image_folder
from sit.checkpoint import model_shape_name
from sit.errors import UsageError
from sit.grid import GridLayout, label_rows
from sit.training.experiment import checkpoint_in_folder
from sit.training.preview import preview_inputs

TINY = {"depth": 1, "hidden_size": 32, "num_heads": 2, "learn_sigma": False}
FOLDER = "custom-d1-w32-p2-Linear-velocity-None"


def train_argv(data: str, results: str) -> list:
    return ["--data-path", data, "--vae", "none", "--image-size", "8", "--num-classes", "2", "--model", "SiT-S/2",
            "--model-config", json.dumps(TINY), "--no-random-flip", "--results-dir", results, "--global-batch-size", "4",
            "--max-steps", "3", "--log-every", "2", "--ckpt-every", "2", "--sample-every", "2", "--num-workers", "0"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same tiny pixel-space command twice in a row (as a user repeating the quick start): (root, the
    runs' stderr)."""
    root = tmp_path_factory.mktemp("experiments")
    data = make_image_folder(str(root / "data"), num_classes=2, per_class=4, size=8)
    errors = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        for _ in range(2):
            stderr, stdout = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
                train.main(train_argv(data, str(root / "results")))
            errors.append(stderr.getvalue())
    return root, errors


def test_model_shape_names():
    assert model_shape_name({"depth": 12, "hidden_size": 384, "patch_size": 2, "num_heads": 6}) == "SiT-S/2"
    assert model_shape_name({"depth": 4, "hidden_size": 64, "patch_size": 2, "num_heads": 4}) == "custom-d4-w64-p2"


def test_experiments_are_named_after_the_real_shape_and_point_at_their_newest_checkpoint(two_runs):
    results = two_runs[0] / "results"
    assert sorted(os.listdir(results)) == [f"000-{FOLDER}", f"001-{FOLDER}"]
    for name in os.listdir(results):
        experiment = results / name
        assert sorted(os.listdir(experiment / "checkpoints")) == ["0000002.pt", "0000003.pt"]
        newest = os.path.abspath(experiment / "checkpoints" / "0000003.pt")
        assert (experiment / "latest.txt").read_text() == newest + "\n"
        log = (experiment / "log.txt").read_text()
        assert f"Saved checkpoint to {experiment / 'checkpoints' / '0000003.pt'}" in log
        assert (f"Newest checkpoint in {experiment}/latest.txt; sample it with `python sample.py ODE --ckpt {experiment} "
                f"--class-labels 0,1`") in log  # the model's own labels (sample.py's default are ImageNet's)


def test_the_first_loss_line_comes_after_step_1_and_the_regular_lines_are_unchanged(two_runs):
    log = (two_runs[0] / "results" / f"000-{FOLDER}" / "log.txt").read_text()
    lines = re.findall(r"\(step=(\d{7})\) Train Loss: ([0-9.]+)(.*)", log)
    assert [(int(step), rest.startswith(",") or rest) for step, _, rest in lines] == \
        [(1, " (first step of this run)"), (2, True)]  # then --log-every: steps 1-2 averaged
    assert "CPU threads: 1 per process (OMP_NUM_THREADS=1)" in log
    first, second = (float(loss) for _, loss, _ in lines)
    assert first > 0 and second > 0
    # stderr is no terminal here: plain progress lines, the last one when the run ends
    assert all(errors.strip().splitlines()[-1].startswith("train: 3/3 step (100%), ") for errors in two_runs[1])


def test_preview_grids_labels_are_in_the_experiment_folder(two_runs):
    samples = two_runs[0] / "results" / f"000-{FOLDER}" / "samples"
    assert os.listdir(samples) == ["0000002.png"]
    config = torch.load(two_runs[0] / "results" / f"000-{FOLDER}" / "checkpoints" / "0000002.pt", weights_only=True)["model_config"]
    _, labels = preview_inputs(0, config)  # --global-seed 0: the grid's fixed labels
    written = (samples.parent / "preview_labels.txt").read_text()
    assert written.splitlines() == label_rows(labels.tolist(), GridLayout.with_columns(16, 4))  # 4 rows of 4
    assert len(written.splitlines()) == 4 and all(len(row.split()) == 4 for row in written.splitlines())


def test_a_folder_as_ckpt_takes_its_newest_checkpoint(two_runs, tmp_path):
    results = str(two_runs[0] / "results")
    newest = os.path.join(results, f"001-{FOLDER}", "checkpoints", "0000003.pt")
    assert checkpoint_in_folder(results) == (newest, f"--ckpt {results}: the newest experiment's newest checkpoint, {newest}")
    older = os.path.join(results, f"000-{FOLDER}")
    assert checkpoint_in_folder(older)[0] == os.path.join(older, "checkpoints", "0000003.pt")
    with pytest.raises(UsageError, match=r"^--ckpt .*checkpoints/<step>.pt"):
        checkpoint_in_folder(str(tmp_path))
    _, by_folder = sample_ddp.parse_args(["ODE", "--ckpt", results])
    _, by_file = sample_ddp.parse_args(["ODE", "--ckpt", newest])
    assert by_folder.request.ckpt == by_file.request.ckpt == newest  # the same checkpoint, the same sample folder
    assert by_folder.request.ckpt_choice.endswith(newest) and by_file.request.ckpt_choice is None


def test_sample_py_from_the_results_folder_says_what_it_sampled(two_runs, tmp_path, capsys):
    results = str(two_runs[0] / "results")
    newest = os.path.join(results, f"001-{FOLDER}", "checkpoints", "0000003.pt")
    sample.main(["ODE", "--ckpt", results, "--class-labels", "0,1", "--num-sampling-steps", "5",
                 "--output", str(tmp_path / "grid.png")])
    captured = capsys.readouterr()
    assert f"--ckpt {results}: the newest experiment's newest checkpoint, {newest}" in captured.out
    assert f"custom-d1-w32-p2 ({newest}), 8px, ODE dopri5 (adaptive steps, atol 1e-06, rtol 0.001)" in captured.out
    (evaluations,) = re.findall(r"dopri5: adaptive, (\d+) model evaluations", captured.out)
    assert "250 steps" not in captured.out and "5 steps" not in captured.out
    # dopri5: 2 evaluations to choose the first step, then 6 a step (accepted or not); the progress
    # display counted the same calls independently
    assert (int(evaluations) - 2) % 6 == 0
    assert re.search(rf"sampling: 1/1 t \(100%\), .*evaluations {evaluations}$", captured.err.strip())


def test_a_failed_run_without_a_checkpoint_is_passed_over(tmp_path):
    """`--ckpt results` after a run that died before its first checkpoint: the newest experiment with one."""
    for name, steps in (("000-SiT-S-2-Linear-velocity-None", (5, 40, 100)), ("001-SiT-S-2-Linear-velocity-None", (7,)),
                        ("002-custom-d1-w32-p2-Linear-velocity-None", ())):
        os.makedirs(tmp_path / name / "checkpoints")
        for step in steps:
            (tmp_path / name / "checkpoints" / f"{step:07d}.pt").write_bytes(b"")
    path, choice = checkpoint_in_folder(str(tmp_path))
    assert path == str(tmp_path / "001-SiT-S-2-Linear-velocity-None" / "checkpoints" / "0000007.pt")
    oldest = str(tmp_path / "000-SiT-S-2-Linear-velocity-None")
    assert checkpoint_in_folder(oldest, "--resume") == (
        os.path.join(oldest, "checkpoints", "0000100.pt"),
        f"--resume {oldest}: its newest checkpoint, {os.path.join(oldest, 'checkpoints', '0000100.pt')}")


def test_folder_names_mark_what_changes_what_is_learnt_and_take_an_exp_name():
    """The original's name for the original's settings; REPA, post-hoc EMA, a time schedule and a latent space
    of the table other than SD-VAE's are marked; --exp-name names the folder instead."""
    import train
    from train_configs import resolve_train_config

    def name(*flags: str) -> str:
        args, explicit = train.parse_args(["--data-path", "/d", "--model", "SiT-B/2", *flags])
        return resolve_train_config(vars(args), explicit)[0].folder_name()

    assert name() == "SiT-B-2-Linear-velocity-None"
    assert name("--vae", "none", "--prediction", "noise") == "SiT-B-2-Linear-noise-None"
    assert name("--repa-encoder", "dinov2-vit-b", "--phema-stds", "0.05", "--time-sampling", "logit-normal",
                "--time-shift", "3") == "SiT-B-2-Linear-velocity-None-logitnormal-shift3-repa8-phema"
    assert name("--time-sampling", "logit-normal", "--time-mean", "-0.5") == \
        "SiT-B-2-Linear-velocity-None-logitnormal-0.5_1"
    assert name("--exp-name", "my-ablation") == "my-ablation"
