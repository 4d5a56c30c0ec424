"""sample.py, sample_ddp.py and sit.sampling: tiny checkpoints, a tiny VAE, CPU, no network."""
import argparse
import csv
import dataclasses
import glob
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, assert_names
import sample
import sample_ddp
from models import SiT
from sit.config import GuidanceConfig, TransportConfig
from sit.distributed import DistContext, agree
from sit.errors import RunFailure, UsageError, reported_as
from sit.generation import blocks_of_rank, guided_sample, index_blocks, noise_and_labels, seed_for
from sit.log import create_logger
from sit.sampling import folder as sample_folder
from sit.sampling import images as sample_images
from sit.sampling.images import write_missing_images
from sit.sampling.loading import load_for_sampling
from sit.sampling.settings import resolve_model_settings, resolve_vae

TINY = dict(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10)
FAST_ODE = ["--sampling-method", "euler", "--num-sampling-steps", "4"]


def write_checkpoint(path, vae_dir, random_weights=True, prediction="velocity", seed=0, **config):
    """A checkpoint shaped like train.py's: model, ema, args (a Namespace), model_config."""
    torch.manual_seed(seed)
    model = SiT(**{**TINY, **config})
    if random_weights:  # a fresh SiT outputs exactly 0; random weights give varied images
        for parameter in model.parameters():
            torch.nn.init.normal_(parameter, std=0.05)
    args = argparse.Namespace(model="SiT-S/2", image_size=32, num_classes=model.num_classes, vae=vae_dir,
                              path_type="Linear", prediction=prediction, loss_weight=None, train_eps=None,
                              sample_eps=None)
    state = model.state_dict()
    torch.save({"model": state, "ema": state, "opt": {}, "args": args, "model_config": model.config,
                "train_steps": 2, "epoch": 0}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_vae):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "0000002.pt", tiny_vae)


def run_script(args, cwd, timeout=120, torchrun_procs=None):
    """Run a script of the repo; returns the CompletedProcess (text output)."""
    if torchrun_procs:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={torchrun_procs}"] + [os.path.join(REPO, args[0])] + args[1:]
    else:
        command = [sys.executable, os.path.join(REPO, args[0])] + args[1:]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def usage_message(parse, argv, capsys):
    """The message of a refused command line: argparse's own (exit 2, on stderr) or a UsageError's (exit 2)."""
    try:
        with pytest.raises(SystemExit) as exit_info:
            parse(argv)
    except UsageError as error:
        return str(error)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def settings_without_checkpoint(config, vae="ema", image_size=256):
    """ModelSettings as for a checkpoint that holds no settings (the flags and the defaults decide)."""
    info = {"model_name": None, "image_size": image_size, "num_classes": 1000, "in_channels": 4,
            "pixel_space": False, "vae": None, "transport": None}
    return resolve_model_settings(config, info, has_null_class=True, vae_default=vae)


def only_folder(sample_dir):
    folders = [path for path in glob.glob(os.path.join(sample_dir, "*")) if os.path.isdir(path)]
    assert len(folders) == 1, folders
    return folders[0]


def read_pngs(folder):
    names = sorted(name for name in os.listdir(folder) if name.endswith(".png"))
    return names, np.stack([np.asarray(Image.open(os.path.join(folder, name))) for name in names])


#################################################################################
#                              sit.sampling helpers                             #
#################################################################################

def test_per_index_noise_does_not_depend_on_the_batch():
    z_all, y_all = noise_and_labels(range(6), 0, (4, 2, 2), 10)
    z_part, y_part = noise_and_labels([3, 4], 0, (4, 2, 2), 10)
    assert torch.equal(z_all[3:5], z_part) and torch.equal(y_all[3:5], y_part)
    assert not torch.equal(z_all[0], z_all[1])
    z_other, _ = noise_and_labels(range(6), 1, (4, 2, 2), 10)
    assert not torch.equal(z_all, z_other)  # the global seed matters
    assert y_all.dtype == torch.int64 and 0 <= int(y_all.min()) and int(y_all.max()) < 10
    # the SDE stream of a batch starting at i is not image i's noise stream
    assert seed_for(0, 3, "image") != seed_for(0, 3, "sde")


def test_blocks_are_dealt_to_ranks_independently_of_their_number():
    blocks = index_blocks(10, 4)
    assert blocks == [range(0, 4), range(4, 8), range(8, 10)]
    assert blocks_of_rank(blocks, 0, 2) == [range(0, 4), range(8, 10)]
    assert blocks_of_rank(blocks, 1, 2) == [range(4, 8)]
    assert blocks_of_rank(blocks, 3, 4) == []


def test_folder_name_changes_with_every_image_setting():
    base = ["ODE", "--model", "SiT-S/2", "--ckpt", "a/0001.pt"]
    variants = [[], ["--cfg-scale", "2"], ["--num-sampling-steps", "10"], ["--sampling-method", "euler"],
                ["--path-type", "GVP"], ["--prediction", "noise"], ["--global-seed", "3"], ["--atol", "1e-5"],
                ["--rtol", "1e-2"], ["--per-proc-batch-size", "8"], ["--sample-eps", "0.01"],
                ["--cfg-scale", "2", "--guide-all-channels"], ["--cfg-scale", "2", "--cfg-interval", "0", "0.7"],
                ["--sampling-method", "euler", "--time-shift", "3"]]
    names = set()
    for extra in variants:
        _, config = sample_ddp.parse_args(base + extra)
        names.add(sample_folder.folder_name(config, settings_without_checkpoint(config)))
    _, config = sample_ddp.parse_args(base)
    settings = settings_without_checkpoint(config)
    names |= {sample_folder.folder_name(config, dataclasses.replace(settings, vae=vae)) for vae in ("mse", None)}
    # same file name, another run
    names.add(sample_folder.folder_name(config, dataclasses.replace(settings, ckpt="b/0001.pt")))
    sde = ["SDE", "--model", "SiT-S/2", "--ckpt", "a/0001.pt"]
    for extra in [[], ["--diffusion-form", "SBDM"], ["--diffusion-norm", "2"], ["--last-step", "Tweedie"],
                  ["--last-step-size", "0.1"]]:
        _, config = sample_ddp.parse_args(sde + extra)
        names.add(sample_folder.folder_name(config, settings_without_checkpoint(config)))
    assert len(names) == len(variants) + 3 + 5


def test_defaults_are_the_originals():
    args, config = sample.parse_args(["ODE"])
    assert (config.guidance.scale, config.sampler.num_steps, config.seed) == (4.0, 250, 0)
    assert config.precision != "fp32"  # TF32 matmuls, the original's
    assert (config.sampler.sampling_method, config.sampler.atol, config.sampler.rtol) == ("dopri5", 1e-6, 1e-3)
    transport = settings_without_checkpoint(config, vae="mse").transport
    assert (transport.path_type, transport.prediction, transport.loss_weight) == ("Linear", "velocity", None)
    assert resolve_vae(None, {"vae": None, "in_channels": 4, "pixel_space": False}, "mse") == "mse"
    args, config = sample_ddp.parse_args(["SDE", "--no-tf32"])
    assert (config.guidance.scale, config.seed, config.batch_size, config.num_images) == (1.0, 0, 4, 50_000)
    assert (args.sample_dir, config.precision, config.guidance.interval) == ("samples", "fp32", (0.0, 1.0))
    sde = config.sampler
    assert (sde.sampling_method, sde.diffusion_form, sde.last_step, sde.last_step_size) == ("Euler", "sigma", "Mean", 0.04)


def test_transport_settings_come_from_the_checkpoint():
    stored = {"path_type": "GVP", "prediction": "noise", "loss_weight": "likelihood", "train_eps": 1e-3, "sample_eps": None}
    info = {"model_name": None, "image_size": 32, "num_classes": 10, "in_channels": 4, "pixel_space": False,
            "vae": None, "transport": stored}

    def transport_of(flags):
        _, config = sample.parse_args(["ODE"] + flags)
        return resolve_model_settings(config, info, has_null_class=True, vae_default="mse").transport

    assert transport_of([]) == TransportConfig("GVP", "noise", "likelihood", 1e-3, None)
    transport = transport_of(["--prediction", "noise", "--sample-eps", "0.01"])
    assert (transport.prediction, transport.sample_eps) == ("noise", 0.01)
    for flags in (["--prediction", "velocity"], ["--path-type", "Linear"], ["--loss-weight", "None"]):
        with pytest.raises(UsageError, match="the checkpoint was trained with"):
            transport_of(flags)


@pytest.mark.parametrize("argv, message", [
    ([], "sampling mode, ODE or SDE"),
    (["--cfg-scale", "2"], "sampling mode, ODE or SDE"),
    (["ode"], "sampling mode, ODE or SDE"),
    (["ODE", "--cfg-scal", "2"], "unrecognized arguments: --cfg-scal"),
    (["ODE", "--sampling-method", "Euler"], "invalid choice: 'Euler'"),
    (["SDE", "--diffusion-form", "inccreasing-decreasing"], "invalid choice"),
    (["ODE", "--model", "SiT-XXL/2"], "invalid choice: 'SiT-XXL/2'"),
    (["ODE", "--prediction", "eps"], "invalid choice: 'eps'"),
    (["ODE", "--num-sampling-steps", "0"], "must be a positive integer"),
    (["ODE", "--num-sampling-steps", "1"], "at least 2"),
    (["ODE", "--per-proc-batch-size", "-1"], "must be a positive integer"),
    (["ODE", "--num-fid-samples", "0"], "must be a positive integer"),
    (["ODE", "--cfg-scale", "0.5"], "must be >= 1"),
    (["ODE", "--image-size", "100"], "multiple of 8"),
    (["ODE", "--cfg-interval", "0.8", "0.2", "--cfg-scale", "2"], "LO <= HI"),
    (["SDE", "--likelihood"], "ODE mode only"),
    (["ODE", "--likelihood", "--cfg-scale", "1.5"], "--cfg-scale 1"),
    (["ODE", "--data-path", "/nonexistent"], "only with --likelihood"),
    (["ODE", "--global-seed", "-1"], "must be >= 0"),
])
def test_bad_command_lines_exit_with_a_usage_message(argv, message, capsys):
    assert message in usage_message(sample_ddp.parse_args, argv, capsys)


@pytest.mark.parametrize("argv, message", [
    (["ODE", "--class-labels", "1,x"], "comma-separated"),
    (["ODE", "--likelihood"], "sample_ddp.py"),
    (["ODE", "--num-images", "0"], "positive integer"),
    (["ODE", "--output", "grid.jepg"], "needs an image extension that PIL can write, such as .png or .jpg (got .jepg)"),
    (["ODE", "--output", "grid"], "(got none)"),
    (["ODE", "--output", "grid.psd"], "(got .psd)"),  # PIL reads .psd but cannot write it
])
def test_sample_py_bad_command_lines(argv, message, capsys):
    assert message in usage_message(sample.parse_args, argv, capsys)


@pytest.mark.parametrize("argv, expected", [
    (["ODE"], "tf32"),
    (["ODE", "--no-tf32"], "fp32"),
    (["ODE", "--tf32"], "tf32"),
    (["SDE", "--precision", "bf16"], "bf16"),
    (["ODE", "--no-tf32", "--precision", "fp32"], "fp32"),
])
def test_sampling_precision_flags(argv, expected):
    assert sample.parse_args(argv)[1].precision == expected
    _, config = sample_ddp.parse_args(argv)
    assert config.precision == expected


@pytest.mark.parametrize("argv, message", [
    (["ODE", "--no-tf32", "--precision", "bf16"], "--no-tf32 means --precision fp32"),
    (["ODE", "--tf32", "--precision", "fp32"], "--tf32 contradicts --precision fp32"),
    (["ODE", "--precision", "fp8"], "invalid choice: 'fp8'"),
])
def test_contradicting_precision_flags_are_one_line_errors(argv, message, capsys):
    assert message in usage_message(sample_ddp.parse_args, argv, capsys)


def test_sample_py_output_folder_is_checked_before_sampling(tmp_path, capsys, monkeypatch):
    (tmp_path / "file.txt").write_text("")
    args, _ = sample.parse_args(["ODE", "--output", str(tmp_path / "new" / "deeper" / "grid.JPG")])
    assert args.output.endswith("JPG")
    assert not (tmp_path / "new").exists()  # checked, not created
    argv = ["ODE", "--output", str(tmp_path / "file.txt" / "sub" / "grid.png")]
    assert f"{tmp_path / 'file.txt'} is not a folder" in usage_message(sample.parse_args, argv, capsys)
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(tmp_path))  # as a read-only folder for a non-root user
    argv = ["ODE", "--output", str(tmp_path / "sub" / "grid.png")]
    assert f"cannot write in {tmp_path}" in usage_message(sample.parse_args, argv, capsys)


#################################################################################
#                                   sample.py                                   #
#################################################################################

def test_sample_py_ode_and_sde_grids(ckpt, tmp_path):
    """In-process: a grid of 4 columns, reproducible for a seed, different for another seed."""
    common = ["--ckpt", ckpt, "--num-sampling-steps", "5", "--class-labels", "1,2,3,4,5"]
    sample.main(["ODE", *common, "--sampling-method", "euler", "--output", str(tmp_path / "ode.png")])
    sample.main(["ODE", *common, "--sampling-method", "euler", "--output", str(tmp_path / "ode_again.png")])
    sample.main(["ODE", *common, "--sampling-method", "euler", "--seed", "1", "--output", str(tmp_path / "seed1.png")])
    sample.main(["SDE", *common, "--num-images", "6", "--output", str(tmp_path / "sub" / "sde.png")])
    ode = np.asarray(Image.open(tmp_path / "ode.png"))
    assert ode.shape == (2 * 34 + 2, 4 * 34 + 2, 3)  # 5 images of 32 px, 4 columns, 2 px padding
    assert np.array_equal(ode, np.asarray(Image.open(tmp_path / "ode_again.png")))
    assert not np.array_equal(ode, np.asarray(Image.open(tmp_path / "seed1.png")))
    assert np.asarray(Image.open(tmp_path / "sub" / "sde.png")).shape == (70, 138, 3)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temporary files left


def test_sample_py_time_shift_moves_the_fixed_steps_and_adaptive_solvers_refuse_it(ckpt, tmp_path):
    """--time-shift 1 is the uniform grid exactly; another shift changes the images; dopri5 refuses it."""
    common = ["ODE", "--ckpt", ckpt, "--num-sampling-steps", "5", "--class-labels", "1,2", "--sampling-method", "euler"]
    for name, extra in (("plain", []), ("one", ["--time-shift", "1"]), ("three", ["--time-shift", "3"])):
        sample.main([*common, *extra, "--output", str(tmp_path / f"{name}.png")])
    plain, one, three = (np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("plain", "one", "three"))
    assert np.array_equal(plain, one) and not np.array_equal(plain, three)
    with pytest.raises(UsageError, match="time"):
        sample.main(["ODE", "--ckpt", ckpt, "--time-shift", "3", "--class-labels", "1", "--output", str(tmp_path / "adaptive.png")])


def test_sample_py_doubles_the_batch_even_at_cfg_1_as_the_original(ckpt, tmp_path, monkeypatch):
    """The original sample.py always samples [z, z] with [y, null] through forward_with_cfg: at
    --cfg-scale 1 the SDE then draws 2N noises per step, so the plain N-image path gives other images."""
    import sit.generation

    calls = []

    def recording(sample_fn, model, z, y, guidance, always_guide=False):
        calls.append(dict(sample_fn=sample_fn, model=model, z=z.clone(), y=y.clone(), rng=torch.get_rng_state()))
        calls[-1]["latents"] = guided_sample(sample_fn, model, z, y, guidance, always_guide)
        return calls[-1]["latents"]

    monkeypatch.setattr(sit.generation, "guided_sample", recording)  # what generate_latents calls
    sample.main(["SDE", "--ckpt", ckpt, "--num-sampling-steps", "4", "--cfg-scale", "1", "--class-labels", "1,2,3",
                 "--output", str(tmp_path / "grid.png")])
    (call,) = calls
    model, z, y = call["model"], call["z"], call["y"]
    torch.set_rng_state(call["rng"])  # the same seeded state: the doubled computation by hand
    doubled = call["sample_fn"](torch.cat([z, z]), model.forward_with_cfg, y=torch.cat([y, torch.full_like(y, 10)]),
                                cfg_scale=1.0)[-1]
    assert torch.equal(call["latents"], doubled.chunk(2)[0])
    torch.set_rng_state(call["rng"])
    plain = call["sample_fn"](z, model.forward, y=y)[-1]
    assert not torch.allclose(call["latents"], plain, atol=1e-3)
    torch.set_rng_state(call["rng"])  # sample_ddp.py keeps the original sample_ddp.py's rule: plain at cfg 1
    assert torch.equal(guided_sample(call["sample_fn"], model, z, y, GuidanceConfig(1.0)), plain)


def test_sample_py_default_labels_need_1000_classes(ckpt, tmp_path):
    with pytest.raises(UsageError, match="pass --class-labels"):
        sample.main(["ODE", "--ckpt", ckpt, *FAST_ODE, "--output", str(tmp_path / "x.png")])
    with pytest.raises(UsageError) as error:
        sample.main(["ODE", "--ckpt", ckpt, *FAST_ODE, "--class-labels", "3,10", "--output", str(tmp_path / "x.png")])
    assert_names(error.value, "--class-labels [10]")


@pytest.mark.slow
def test_sample_py_script_logs_time_and_model_evaluations(ckpt, tmp_path):
    result = run_script(["sample.py", "ODE", "--ckpt", ckpt, *FAST_ODE, "--class-labels", "1,2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 model evaluations" in result.stdout  # euler, 4 grid points
    assert Image.open(tmp_path / "sample.png").size == (2 * 34 + 2, 36)


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("shape", "--model SiT-B/2 but the checkpoint holds"),
    ("size", "--image-size 64 but the checkpoint was trained at 32"),
    ("missing", "no SiT checkpoint at"),
    ("vae", "could not load the VAE"),
    ("evil", "refused to load"),
    ("mode", "sampling mode, ODE or SDE"),
])
def test_bad_input_scripts_end_with_one_line_and_no_traceback(case, message, ckpt, tmp_path):
    flags = {"shape": ["--model", "SiT-B/2"], "size": ["--image-size", "64"], "missing": [],
             "vae": ["--vae", str(tmp_path)], "evil": [], "mode": []}[case]
    checkpoint = {"missing": str(tmp_path / "nope.pt"), "evil": str(tmp_path / "evil.pt")}.get(case, ckpt)
    if case == "evil":
        class RunsCode:  # unpickling this would create the marker folder
            def __reduce__(self):
                return (os.mkdir, (str(tmp_path / "pwned"),))
        torch.save({"model": RunsCode()}, checkpoint)
    argv = ["sample_ddp.py", "ODE", "--ckpt", checkpoint, *FAST_ODE, "--num-fid-samples", "2", *flags]
    if case == "mode":
        argv = ["sample.py", "--ckpt", checkpoint]
    result = run_script(argv, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "pwned").exists()


#################################################################################
#                                 sample_ddp.py                                 #
#################################################################################

@pytest.mark.slow
def test_one_and_two_gloo_processes_give_the_same_images(ckpt, tmp_path):
    flags = ["ODE", "--cfg-scale", "2", *FAST_ODE, "--ckpt", ckpt, "--num-fid-samples", "7", "--per-proc-batch-size", "2"]
    sample_ddp.main([*flags, "--sample-dir", str(tmp_path / "one")])
    result = run_script(["sample_ddp.py", *flags, "--sample-dir", str(tmp_path / "two")], cwd=tmp_path, torchrun_procs=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = only_folder(tmp_path / "one"), only_folder(tmp_path / "two")
    assert os.path.basename(one) == os.path.basename(two)
    names_one, images_one = read_pngs(one)
    names_two, images_two = read_pngs(two)
    assert names_one == names_two == [f"{i:06d}.png" for i in range(7)]
    assert np.array_equal(images_one, images_two)
    assert len({image.tobytes() for image in images_one}) == 7  # every index its own image
    packed = np.load(f"{two}.npz")["arr_0"]
    assert packed.dtype == np.uint8 and packed.shape == (7, 32, 32, 3)
    assert np.array_equal(packed, images_one)


@pytest.mark.slow
def test_balanced_labels_are_the_same_on_one_and_two_gloo_processes(tmp_path):
    from test_grid import pixel_checkpoint

    pixel = pixel_checkpoint(tmp_path / "pixel.pt")  # 10 classes
    flags = ["ODE", "--ckpt", pixel, *FAST_ODE, "--num-fid-samples", "30", "--per-proc-batch-size", "4",
             "--label-sampling", "balanced"]
    sample_ddp.main([*flags, "--sample-dir", str(tmp_path / "one")])
    result = run_script(["sample_ddp.py", *flags, "--sample-dir", str(tmp_path / "two")], cwd=tmp_path,
                        torchrun_procs=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = only_folder(tmp_path / "one"), only_folder(tmp_path / "two")
    assert os.path.basename(one) == os.path.basename(two) and one.endswith("-labels-balanced-30")
    with np.load(f"{one}.npz") as first, np.load(f"{two}.npz") as second:
        assert np.array_equal(first["labels"], second["labels"]) and np.array_equal(first["arr_0"], second["arr_0"])
        assert np.bincount(second["labels"], minlength=10).tolist() == [3] * 10


@pytest.mark.slow
def test_a_setup_failure_on_rank_0_ends_both_gloo_processes_with_its_message(ckpt, tmp_path):
    """--sample-dir inside a file: rank 0's makedirs fails (OSError); rank 1 does not wait for it."""
    (tmp_path / "file.txt").write_text("")
    flags = ["ODE", *FAST_ODE, "--ckpt", ckpt, "--num-fid-samples", "2", "--sample-dir", str(tmp_path / "file.txt")]
    # A rank left waiting would hang until the 30-minute collective timeout; run_script's timeout ends the test then.
    result = run_script(["sample_ddp.py", *flags], cwd=tmp_path, torchrun_procs=2, timeout=300)
    assert result.returncode != 0
    # printed once (by rank 0); rank 1 ends on its own with the same error (exit 1), not killed by torchrun
    lines = [line for line in result.stderr.splitlines() if "sample_ddp.py: error: " in line]
    assert len(lines) == 1, result.stderr[-3000:]
    assert_names(lines[0], "--sample-dir", str(tmp_path / "file.txt"), "Not a directory")
    assert re.search(r"rank\s*:\s*1 .*\n.*exitcode\s*:\s*1 ", result.stderr), result.stderr[-3000:]
    assert 'sample_ddp.py", line' not in result.stderr  # no Python traceback from the script


def test_agree_turns_a_failure_into_one_line_on_every_rank(tmp_path, monkeypatch):
    import sit.distributed

    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    assert agree(ctx, lambda: 3) == 3 and agree(ctx, None) is None

    def denied():
        with reported_as("cannot write here"):
            raise PermissionError(13, "denied")

    with pytest.raises(RunFailure, match=r"^cannot write here: \[Errno 13\] denied$"):
        agree(ctx, denied)
    (tmp_path / "file.txt").write_text("")
    folder = str(tmp_path / "file.txt" / "samples")
    with pytest.raises(RunFailure) as error:
        agree(ctx, lambda: sample_folder.create_sample_folder(folder, create_logger(None)))
    assert_names(error.value, "--sample-dir", folder, "Errno 20")

    def refuse():
        raise UsageError("--model SiT-B/2 needs --ckpt")

    with pytest.raises(UsageError, match=r"^--model SiT-B/2 needs --ckpt$"):
        agree(ctx, refuse)
    # another rank failed: this one stops too, with that rank's message (the gathered list, in rank order)
    monkeypatch.setattr(sit.distributed, "any_rank", lambda flag, device, group=None: True)
    monkeypatch.setattr(sit.distributed, "gather_objects", lambda report: [report, ("run", "rank 1's refusal")])
    with pytest.raises(RunFailure, match=r"^rank 1's refusal$"):
        agree(ctx, lambda: 3)


def test_a_killed_npz_build_leaves_a_temporary_file_that_the_next_run_removes(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "samples" / "SiT-S-2-run-cfg-1.0"
    folder.mkdir(parents=True)
    for index in range(2):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(sample_folder.png_path(str(folder), index))
    temporary = []

    def killed(folder, num, image_shape, path):
        temporary.append(path)
        raise KeyboardInterrupt  # atomic_write cleans up after this; a SIGKILL would not

    monkeypatch.setattr(sample_folder, "write_npz_stream", killed)
    with pytest.raises(KeyboardInterrupt):
        sample_folder.create_npz_from_sample_folder(str(folder), 2)
    (path,) = temporary
    assert os.path.dirname(path) == str(tmp_path / "samples")
    assert os.path.basename(path).startswith(".tmp-") and path.endswith(sample_folder.npz_temporary_suffix(str(folder)))
    open(path, "wb").close()  # what the SIGKILL leaves, and an earlier retry's
    open(tmp_path / "samples" / f".tmp-earlier1{sample_folder.npz_temporary_suffix(str(folder))}", "wb").close()
    others = tmp_path / "samples" / f".tmp-abcdefgh{sample_folder.npz_temporary_suffix('another-folder')}"
    open(others, "wb").close()  # another folder's build, perhaps running now: kept
    sample_folder.create_sample_folder(str(folder), create_logger(None))
    assert "(removed 2 unfinished files)" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "samples")) == [others.name, folder.name]


def sample_as_three_ranks(argv: list) -> str:
    """sample_ddp.py's image loop of each rank of a 3-process job (ranks 2, 0, 1, one after another, in this
    process) for the command line argv; returns the sample folder."""
    args, config = sample_ddp.parse_args(argv)
    loaded = load_for_sampling(config, torch.device("cpu"), "ema")
    folder = os.path.join(args.sample_dir, sample_folder.folder_name(config, loaded.settings))
    os.makedirs(folder)
    for rank in (2, 0, 1):
        ctx = DistContext(rank=rank, world_size=3, local_rank=rank, device=torch.device("cpu"))
        write_missing_images(ctx, config, loaded, folder, create_logger(None))
    return folder


def test_sde_images_do_not_depend_on_the_number_of_processes(ckpt, tmp_path):
    """The ranks' loops of a 3-process job, run one after another here, give the one-process images."""
    flags = ["SDE", "--num-sampling-steps", "4", "--ckpt", ckpt, "--num-fid-samples", "5", "--per-proc-batch-size", "2"]
    sample_ddp.main([*flags, "--sample-dir", str(tmp_path / "one")])
    folder = sample_as_three_ranks([*flags, "--sample-dir", str(tmp_path / "three")])
    one = only_folder(tmp_path / "one")
    assert os.path.basename(one) == os.path.basename(folder)
    names, images = read_pngs(one)
    assert names == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(images, read_pngs(folder)[1])
    assert len({image.tobytes() for image in images}) == 5


def test_a_blocks_pngs_are_written_while_the_next_block_samples(ckpt, tmp_path, monkeypatch):
    """Block 0's PNGs are written by another thread, and their writing is still under way when block 1
    starts sampling (a foreground write would wait the 20 s out); every PNG is there at the end."""
    args, config = sample_ddp.parse_args(["ODE", "--ckpt", ckpt, "--sampling-method", "euler", "--num-sampling-steps",
                                          "2", "--num-fid-samples", "6", "--per-proc-batch-size", "2",
                                          "--sample-dir", str(tmp_path / "samples")])
    loaded = load_for_sampling(config, torch.device("cpu"), "ema")
    folder = os.path.join(args.sample_dir, sample_folder.folder_name(config, loaded.settings))
    os.makedirs(folder)
    next_block_started, writes = threading.Event(), []  # writes: (index, thread, block 1 had started)
    real_blocks, real_save = sample_images.generate_blocks, sample_images.save_png

    def observed_blocks(*args, **kwargs):
        for block in real_blocks(*args, **kwargs):
            yield block
            next_block_started.set()  # runs when the loop asks for the next block

    def observed_save(pixels, path):
        index = int(os.path.basename(path)[:-4])
        started = next_block_started.wait(timeout=20) if index == 0 else next_block_started.is_set()
        writes.append((index, threading.current_thread() is threading.main_thread(), started))
        real_save(pixels, path)

    monkeypatch.setattr(sample_images, "generate_blocks", observed_blocks)
    monkeypatch.setattr(sample_images, "save_png", observed_save)
    write_missing_images(DistContext(0, 1, 0, torch.device("cpu")), config, loaded, folder, create_logger(None))
    assert [index for index, _, _ in writes] == list(range(6))
    assert not any(on_main for _, on_main, _ in writes)
    assert writes[0][2]  # block 1 was sampling while image 0 was being written
    assert all(sample_folder.png_is_complete(sample_folder.png_path(folder, index), 32) for index in range(6))


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_gaps(ckpt, tmp_path):
    flags = ["ODE", "--ckpt", ckpt, "--sampling-method", "euler", "--num-sampling-steps", "25",
             "--num-fid-samples", "12", "--per-proc-batch-size", "2", "--sample-dir", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "sample_ddp.py"), *flags], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    try:
        while time.time() < deadline and process.poll() is None:
            pngs = glob.glob(str(tmp_path / "run" / "*" / "*.png"))
            if len(pngs) >= 4:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    folder = only_folder(tmp_path / "run")
    before = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder) if name.endswith(".png")}
    assert 4 <= len(before) < 12, "the run was not killed mid-way"
    assert not os.path.exists(f"{folder}.npz")
    for name in before:  # every PNG that exists is complete
        Image.open(os.path.join(folder, name)).load()
    open(os.path.join(folder, ".000011.png.99999.tmp"), "wb").close()  # what a kill mid-write leaves

    sample_ddp.main(flags)
    names, images = read_pngs(folder)
    assert names == [f"{i:06d}.png" for i in range(12)]
    assert not [name for name in os.listdir(folder) if name.startswith(".")]
    after = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in before}
    assert after == before  # nothing already complete was written again
    packed = np.load(f"{folder}.npz")["arr_0"]
    assert packed.dtype == np.uint8 and packed.shape == (12, 32, 32, 3) and np.array_equal(packed, images)

    uninterrupted = flags[:-1] + [str(tmp_path / "fresh")]
    sample_ddp.main(uninterrupted)
    assert np.array_equal(read_pngs(only_folder(tmp_path / "fresh"))[1], images)


#################################################################################
#                                   Likelihood                                  #
#################################################################################

def test_likelihood_of_real_images_matches_the_analytic_answer(tmp_path, tiny_vae, image_folder):
    """A fresh SiT outputs 0 (zero-initialised final layer): with a Linear velocity model the flow
    is the identity, so logp(x) is the standard normal log-density of the image's latent."""
    from diffusers.models import AutoencoderKL
    from torchvision.datasets import ImageFolder
    from sit.data.images import image_transform
    from sit.latents import SD_VAE_SCALE

    zero_ckpt = write_checkpoint(tmp_path / "zero.pt", tiny_vae, random_weights=False)
    sample_ddp.main(["ODE", "--likelihood", "--ckpt", zero_ckpt, "--data-path", image_folder, *FAST_ODE,
                     "--per-proc-batch-size", "3", "--sample-dir", str(tmp_path / "out")])
    folder = only_folder(tmp_path / "out")
    with open(os.path.join(folder, "likelihood.csv")) as file:
        rows = list(csv.DictReader(file))
    assert [int(row["index"]) for row in rows] == list(range(8))

    dataset = ImageFolder(image_folder, transform=image_transform(32))
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    with torch.no_grad():
        latents = vae.encode(torch.stack([dataset[i][0] for i in range(8)])).latent_dist.mean * SD_VAE_SCALE
    num_dims = latents[0].numel()
    expected = -num_dims / 2 * math.log(2 * math.pi) - (latents.flatten(1).double() ** 2).sum(1) / 2
    logp = torch.tensor([float(row["logp_nats"]) for row in rows], dtype=torch.float64)
    assert torch.allclose(logp, expected, rtol=1e-5, atol=1e-4)
    assert [int(row["label"]) for row in rows] == [dataset[i][1] for i in range(8)]
    bpd = torch.tensor([float(row["bits_per_dim"]) for row in rows], dtype=torch.float64)
    assert torch.allclose(bpd, -logp / (num_dims * math.log(2)), rtol=1e-6)


def test_likelihood_of_generated_samples(ckpt, tmp_path, capsys):
    sample_ddp.main(["ODE", "--likelihood", "--ckpt", ckpt, *FAST_ODE, "--num-fid-samples", "3",
                     "--sample-dir", str(tmp_path)])
    folder = only_folder(tmp_path)
    assert folder.endswith("-likelihood-generated")
    with open(os.path.join(folder, "likelihood.csv")) as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 3 and all(math.isfinite(float(row["bits_per_dim"])) for row in rows)
    mean_nll = np.mean([float(row["nll_nats"]) for row in rows])
    assert f"mean NLL {mean_nll:.4f} nats" in capsys.readouterr().out


@pytest.mark.parametrize("source", ["generated", "real"])
def test_an_interrupted_likelihood_run_continues_where_it_stopped(ckpt, tmp_path, monkeypatch, image_folder, source):
    """Each finished block's rows are saved at once; the same command again evaluates only the missing
    blocks, and its likelihood.csv is byte for byte an uninterrupted run's."""
    from sit.sampling import likelihood

    data = ["--data-path", image_folder] if source == "real" else []  # 8 images: blocks of 3, 3, 2
    flags = ["ODE", "--likelihood", "--ckpt", ckpt, *FAST_ODE, *data, "--num-fid-samples", "8",
             "--per-proc-batch-size", "3"]
    sample_ddp.main(flags + ["--sample-dir", str(tmp_path / "fresh")])
    with open(os.path.join(only_folder(tmp_path / "fresh"), "likelihood.csv"), "rb") as file:
        uninterrupted = file.read()

    scored = []
    real_scores, real_save = likelihood.LatentMeasure.scores, likelihood.save_block

    def counted_scores(self, data, *args):
        scored.append(len(data))
        return real_scores(self, data, *args)

    def save_then_stop(*args):
        real_save(*args)
        raise KeyboardInterrupt  # killed right after its first block

    monkeypatch.setattr(likelihood.LatentMeasure, "scores", counted_scores)
    monkeypatch.setattr(likelihood, "save_block", save_then_stop)
    resumed = flags + ["--sample-dir", str(tmp_path / "resumed")]
    with pytest.raises(KeyboardInterrupt):
        sample_ddp.main(resumed)
    folder = only_folder(tmp_path / "resumed")
    assert [name for name in os.listdir(folder) if "likelihood" in name] == ["likelihood-block-000000.json"]
    assert scored == [3]

    monkeypatch.setattr(likelihood, "save_block", real_save)
    sample_ddp.main(resumed)
    assert scored == [3, 3, 2]  # only the two missing blocks were evaluated
    with open(os.path.join(folder, "likelihood.csv"), "rb") as file:
        assert file.read() == uninterrupted
    sample_ddp.main(resumed)  # all blocks are there: nothing is evaluated, the same file is written
    assert scored == [3, 3, 2]
    with open(os.path.join(folder, "likelihood.csv"), "rb") as file:
        assert file.read() == uninterrupted


#################################################################################
#                         A checkpoint written by train.py                      #
#################################################################################

@pytest.mark.slow
def test_train_py_checkpoint_samples_with_no_extra_flags(tmp_path, tiny_vae, image_folder):
    """learn_sigma, size, classes, prediction and the VAE all come from the checkpoint."""
    result = run_script(["train.py", "--data-path", image_folder, "--results-dir", str(tmp_path / "results"),
                         "--model", "SiT-S/2", "--model-config", '{"depth": 1, "hidden_size": 32, "num_heads": 2}',
                         "--image-size", "32", "--num-classes", "2", "--max-steps", "2", "--global-batch-size", "4",
                         "--vae", tiny_vae, "--num-workers", "0", "--prediction", "noise"], cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = glob.glob(str(tmp_path / "results" / "*" / "checkpoints" / "*.pt"))
    for mode in ("ODE", "SDE"):
        output = tmp_path / f"{mode}.png"
        sample.main([mode, "--ckpt", checkpoint, "--class-labels", "0,1", "--num-sampling-steps", "4",
                     "--output", str(output)] + (["--sampling-method", "euler"] if mode == "ODE" else []))
        assert Image.open(output).size == (2 * 34 + 2, 36)
    sample_ddp.main(["SDE", "--ckpt", checkpoint, "--num-sampling-steps", "4", "--num-fid-samples", "3",
                     "--sample-dir", str(tmp_path / "samples")])
    folder = only_folder(tmp_path / "samples")
    assert "-noise-" in os.path.basename(folder)  # the checkpoint's prediction was used
    assert np.load(f"{folder}.npz")["arr_0"].shape == (3, 32, 32, 3)
    with pytest.raises(UsageError, match="trained with --prediction noise"):
        sample.main(["ODE", "--ckpt", checkpoint, "--class-labels", "0", "--prediction", "velocity"])


def test_no_ckpt_uses_the_published_model_and_a_failed_download_says_what_to_pass(ckpt, tmp_path, monkeypatch):
    import download

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(download.PUBLISHED_MODELS, download.DEFAULT_MODEL, [f"file://{tmp_path}/missing.pt"])
    with pytest.raises(UsageError, match=r"--ckpt /path/to/SiT-XL-2-256x256.pt"):
        sample.main(["ODE", *FAST_ODE, "--class-labels", "1"])
    monkeypatch.setitem(download.PUBLISHED_MODELS, download.DEFAULT_MODEL, [f"file://{ckpt}"])  # a stand-in "download"
    sample.main(["ODE", *FAST_ODE, "--class-labels", "1"])
    assert (tmp_path / "pretrained_models" / download.DEFAULT_MODEL).is_file()
    assert Image.open(tmp_path / "sample.png").size == (32, 32)  # one image: no grid padding
