"""A new user's mistakes, as a table: every script's and the public API's bad input ends clearly.

Each command-line case runs `main(argv)` in-process under `sit.cli.run_main` (as `python script.py`
would) and asserts: the exit code, exactly one line on stderr (`<script>: error: ...`, or the one
expected warning), no traceback, the words the table names in it (the flag or file, and at most a key
word: not the whole sentence, so that rewording a message does not churn the table), and that no file or
folder appeared, vanished or changed (the whole test tree, results/ and samples/ included, compared before
and after). API cases assert the exception type and the argument named. A few cases run as real processes
too.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Union

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, make_image_folder

TINY_CONFIG = json.dumps({"depth": 1, "hidden_size": 32, "num_heads": 2}, separators=(",", ":"))
TINY = ["--model", "SiT-S/2", "--model-config", TINY_CONFIG, "--vae", "none", "--image-size", "8",
        "--num-classes", "2", "--num-workers", "0", "--global-batch-size", "4"]
QUIET = ["--ckpt-every", "100000", "--sample-every", "100000", "--log-every", "1"]
EXPERIMENT = "000-custom-d1-w32-p2-Linear-velocity-None"  # the tiny model's experiment folder


#################################################################################
#                          The files the mistakes are made with                  #
#################################################################################

@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """Data folders, a 2-step pixel-space checkpoint, its NaN copy, batches and odd files (paths by name)."""
    root = tmp_path_factory.mktemp("assets")
    paths = {"root": str(root)}
    paths["data"] = make_image_folder(str(root / "data"), num_classes=2, per_class=3, size=8)
    paths["data3"] = make_image_folder(str(root / "data3"), num_classes=3, per_class=2, size=8)
    bad = root / "bad"
    for name in ("a", "b"):
        (bad / name).mkdir(parents=True)
        (bad / name / "x.png").write_bytes(b"")
        (bad / name / "y.jpg").write_text("not a picture")
    paths["bad"] = str(bad)
    (root / "empty").mkdir()
    paths["empty"] = str(root / "empty")
    (root / "no_images" / "class0").mkdir(parents=True)
    (root / "no_images" / "class0" / "notes.txt").write_text("text")
    paths["no_images"] = str(root / "no_images")
    paths["file"] = str(root / "afile.txt")
    (root / "afile.txt").write_text("a file, not a folder")
    paths["text_npz"] = str(root / "text.npz")
    (root / "text.npz").write_text("hello, not an npz\n")
    paths["npz"] = str(root / "ok.npz")
    np.savez(paths["npz"], arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    paths["grey_npz"] = str(root / "grey.npz")
    np.savez(paths["grey_npz"], arr_0=np.zeros((4, 8, 8), np.uint8))
    paths["float_npz"] = str(root / "float.npz")
    np.savez(paths["float_npz"], arr_0=np.zeros((4, 8, 8, 3), np.float32))
    paths["none_npz"] = str(root / "none.npz")
    np.savez(paths["none_npz"], arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    paths["other_npz"] = str(root / "other.npz")
    np.savez(paths["other_npz"], images=np.zeros((4, 8, 8, 3), np.uint8))
    paths["results"] = str(root / "results")
    train_tiny(paths, ["--max-steps", "2", "--ckpt-every", "2"])
    paths["ckpt"] = os.path.join(paths["results"], EXPERIMENT, "checkpoints", "0000002.pt")
    paths["experiment"] = os.path.join(paths["results"], EXPERIMENT)
    checkpoint = torch.load(paths["ckpt"], weights_only=True)
    checkpoint["ema"]["final_layer.linear.weight"][0, 0] = float("nan")
    paths["nan"] = str(root / "nan.pt")
    torch.save(checkpoint, paths["nan"])
    paths["vae_missing"] = str(root / "no_vae")
    paths["missing"] = str(root / "missing")
    paths["pipe"] = str(root / "pipe.png")
    os.mkfifo(paths["pipe"])
    return paths


def train_tiny(paths: dict, extra: list) -> None:
    """The 2-step checkpoint the sampling cases load (in-process, as the table's cases run)."""
    import train

    train.main(["--data-path", paths["data"], "--results-dir", paths["results"], *TINY, *QUIET, *extra])


@pytest.fixture
def sandbox(assets, tmp_path, monkeypatch):
    """An empty working directory (results/, samples/, pretrained_models/ would appear here), offline."""
    monkeypatch.chdir(tmp_path)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: import it first with the real environment and
    # switch its constant for this test only, so that later tests in the session are not left offline.
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def tree(*folders: str) -> dict:
    """Every file and folder under the folders: path -> (size, modification time) or "dir"."""
    found = {}
    for folder in folders:
        for parent, names, files in os.walk(folder):
            for name in names:
                found[os.path.join(parent, name)] = "dir"
            for name in files:
                path = os.path.join(parent, name)
                info = os.lstat(path)
                found[path] = (info.st_size, info.st_mtime_ns)
    return found


#################################################################################
#                                   The table                                   #
#################################################################################

@dataclass(frozen=True)
class Mistake:
    """A command line of `script` and what it must end with (a row of fixtures/mistakes.tsv)."""
    script: str
    code: int
    argv: str  # split on spaces once {name} placeholders are filled with the assets' paths
    expect: str  # the words of the one stderr line: space-separated, "double quotes" keep a phrase

    def command(self, assets: dict) -> list[str]:
        return self.argv.format(**assets, tiny=TINY_MODEL).split()

    def words(self, assets: dict) -> list[str]:
        return [word.strip('"').format(**assets) for word in re.findall(r'"[^"]*"|\S+', self.expect)]


# a tiny pixel-space model on the assets' 8x8 images, the table's {tiny}
TINY_MODEL = f"--model SiT-S/2 --model-config {TINY_CONFIG} --vae none --image-size 8 --num-classes 2 " \
             f"--num-workers 0 --global-batch-size 4"


def read_table(path: str) -> list[Mistake]:
    """The rows of a table of mistakes: script, exit code, arguments, expected words (tab-separated)."""
    with open(path) as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle if line.strip() and not line.startswith("#")]
    return [Mistake(script, int(code), argv, expect) for script, code, argv, expect in rows]


MISTAKES = read_table(os.path.join(os.path.dirname(__file__), "fixtures", "mistakes.tsv"))


def run_script(script: str, argv: list) -> int:
    """`python <script> argv` in this process: run_main's exit code, or argparse's (SystemExit). Python
    warnings that a real process would print (Python's default filters) go to stderr as they would."""
    import importlib

    from sit.cli import run_main

    module = importlib.import_module(script[:-3])
    program = sys.argv[0]
    sys.argv[0] = os.path.join(REPO, script)  # argparse names the program after it, as in a real run
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", hidden)
        try:
            return run_main(lambda: module.main(argv), script)
        except SystemExit as exit_:
            return exit_.code
        finally:
            sys.argv[0] = program
            for warning in shown:
                print(f"{warning.filename}:{warning.lineno}: {warning.category.__name__}: {warning.message}",
                      file=sys.stderr)


def check_outcome(case: Mistake, code: int, err: str, assets: dict) -> None:
    """The exit code, one stderr line (`<script>: error: ` first unless it exits 0), no traceback, each word."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert code == case.code, (code, err)
    assert len(lines) == 1, err
    prefix = "" if case.code == 0 else f"{case.script}: error: "
    assert lines[0].startswith(prefix), lines[0]
    missing = [word for word in case.words(assets) if word not in lines[0]]
    assert not missing, (missing, lines[0])


@pytest.mark.parametrize("case", MISTAKES, ids=[f"{index:03d}-{case.script}" for index, case in enumerate(MISTAKES)])
def test_a_mistaken_command_line_is_one_clear_line_and_leaves_nothing(case, assets, sandbox, capsys):
    before = tree(assets["root"], str(sandbox))
    code = run_script(case.script, case.command(assets))
    check_outcome(case, code, capsys.readouterr().err, assets)
    assert tree(assets["root"], str(sandbox)) == before


#################################################################################
#                               The public API                                  #
#################################################################################

def api_cases() -> list[tuple[str, Callable[[dict], Any], type, str]]:
    """Name, call, exception type, and the words its message must contain (as the table's: the argument
    named, at most a key word)."""
    import download
    from sit.checkpoint import load_model
    from transport import Sampler, create_transport

    sampler = Sampler(create_transport())
    return [
        ("find_model(None)", lambda a: download.find_model(None), TypeError, "find_model(model_name) NoneType"),
        ("find_model(123)", lambda a: download.find_model(123), TypeError, "find_model(model_name) int"),
        ("find_model(list)", lambda a: download.find_model(["x.pt"]), TypeError, "find_model(model_name) list"),
        ("find_model(missing)", lambda a: download.find_model(a["missing"] + ".pt"), ValueError,
         "{missing}.pt checkpoint"),
        ("find_model(text)", lambda a: download.find_model(a["file"]), ValueError, "{file} readable"),
        ("load_model(123)", lambda a: load_model(123), TypeError, "load_model(ckpt)"),
        ("load_model image_size str", lambda a: load_model(a["ckpt"], image_size="8"), TypeError,
         "load_model(image_size) str"),
        ("load_model image_size 0", lambda a: load_model(a["ckpt"], image_size=0), ValueError,
         "load_model(image_size) positive"),
        ("load_model image_size bool", lambda a: load_model(a["ckpt"], image_size=True), TypeError,
         "load_model(image_size) bool"),
        ("load_model num_classes float", lambda a: load_model(a["ckpt"], num_classes=2.0), TypeError,
         "load_model(num_classes) float"),
        ("load_model model_name int", lambda a: load_model(a["ckpt"], model_name=2), TypeError, "load_model(model_name)"),
        ("load_model model_name unknown", lambda a: load_model(a["ckpt"], model_name="SiT-M/2"), ValueError,
         "--model 'SiT-M/2'"),
        ("load_model NaN", lambda a: load_model(a["nan"]), ValueError,
         "{nan} final_layer.linear.weight NaN"),
        ("create_transport train_eps str", lambda a: create_transport(train_eps="0.1"), TypeError,
         "train_eps str"),
        ("create_transport sample_eps nan", lambda a: create_transport(sample_eps=float("nan")), ValueError,
         "sample_eps finite"),
        ("create_transport sample_eps 0.5", lambda a: create_transport(sample_eps=0.5), ValueError, "sample_eps 0.5"),
        ("create_transport path_type int", lambda a: create_transport(path_type=1), TypeError, "path_type int"),
        ("create_transport prediction typo", lambda a: create_transport(prediction="velo"), ValueError,
         "prediction 'velo'"),
        ("create_transport loss_weight list", lambda a: create_transport(loss_weight=[]), TypeError, "loss_weight list"),
        ("create_transport weighted velocity", lambda a: create_transport("Linear", "velocity", loss_weight="velocity"),
         ValueError, "loss_weight velocity"),
        ("Sampler(str)", lambda a: Sampler("Linear"), TypeError, "transport Transport"),
        ("sample_ode num_steps 1", lambda a: sampler.sample_ode(num_steps=1), ValueError, '"at least 2 steps"'),
        ("sample_ode num_steps str", lambda a: sampler.sample_ode(num_steps="10"), TypeError, "num_steps integer"),
        ("sample_ode atol 0", lambda a: sampler.sample_ode(atol=0), ValueError, "atol positive"),
        ("sample_ode rtol str", lambda a: sampler.sample_ode(rtol="1e-3"), TypeError, "rtol number"),
        ("sample_ode method None", lambda a: sampler.sample_ode(sampling_method=None), TypeError, "sampling_method NoneType"),
        ("sample_ode method typo", lambda a: sampler.sample_ode(sampling_method="Dopri5"), ValueError,
         "sampling_method 'Dopri5'"),
        ("sample_ode reverse int", lambda a: sampler.sample_ode(reverse=1), TypeError, "reverse int"),
        ("sample_sde diffusion_norm", lambda a: sampler.sample_sde(diffusion_norm=-1), ValueError,
         "diffusion_norm 0"),
        ("sample_sde last_step_size 0", lambda a: sampler.sample_sde(last_step_size=0), ValueError,
         '"last step size" positive'),
        ("sample_sde num_steps float", lambda a: sampler.sample_sde(num_steps=2.0), TypeError, "num_steps float"),
        ("sample_sde last_step typo", lambda a: sampler.sample_sde(last_step="mean"), ValueError, "last_step 'mean'"),
        ("sample_sde form int", lambda a: sampler.sample_sde(diffusion_form=0), TypeError, "diffusion_form int"),
        ("likelihood num_probes 0", lambda a: sampler.sample_ode_likelihood(num_probes=0), ValueError,
         "num_probes 1"),
        ("likelihood num_probes float", lambda a: sampler.sample_ode_likelihood(num_probes=1.5), TypeError,
         "num_probes float"),
        ("likelihood exact_trace str", lambda a: sampler.sample_ode_likelihood(exact_trace="yes"), TypeError,
         "exact_trace str"),
    ]


API_NAMES = [name for name, *_ in api_cases()]


@pytest.mark.parametrize("index", range(len(API_NAMES)), ids=API_NAMES)
def test_a_mistaken_api_call_raises_naming_the_argument(index, assets, sandbox):
    _, call, error_type, expect = api_cases()[index]
    before = tree(assets["root"], str(sandbox))
    with pytest.raises(error_type) as raised:
        call(assets)
    message = str(raised.value)
    assert "\n" not in message
    missing = [word for word in Mistake("", 0, "", expect).words(assets) if word not in message]
    assert not missing, (missing, message)
    assert tree(assets["root"], str(sandbox)) == before


#################################################################################
#                 What runs anyway says what it does not apply                   #
#################################################################################

def test_sampling_flags_that_change_nothing_are_warned_about_once(assets, sandbox, capsys):
    argv = ["ODE", "--ckpt", assets["ckpt"], "--class-labels", "0,1", "--sampling-method", "euler",
            "--num-sampling-steps", "2", "--atol", "1e-3", "--loss-weight", "None", "--train-eps", "0.1",
            "--cfg-scale", "1", "--cfg-interval", "0.2", "0.8", "--output", "grid.png"]
    assert run_script("sample.py", argv) == 0
    out, err = capsys.readouterr()
    warnings = [line.split("] ", 1)[1] for line in out.splitlines() if "warning:" in line]
    assert warnings == [
        "warning: --loss-weight None is not used: it weights training losses only",
        "warning: --train-eps 0.1 is not used: it sets the training interval; sampling uses --sample-eps",
        "warning: --cfg-interval is not used: --cfg-scale 1 means no guidance (pass a scale above 1)",
        "warning: --atol is not used: --sampling-method euler takes fixed steps (--num-sampling-steps); tolerances "
        "apply to adaptive solvers such as dopri5",
    ]
    assert os.path.isfile("grid.png") and "Traceback" not in err


def test_resuming_a_checkpoint_whose_loss_weight_is_not_applied_warns(assets, sandbox, capsys):
    """An older run stored --loss-weight with a velocity model: resuming it warns, it is not refused."""
    experiment = sandbox / "results" / EXPERIMENT
    shutil.copytree(assets["experiment"], experiment)
    path = experiment / "checkpoints" / "0000002.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["args"]["loss_weight"] = "likelihood"
    torch.save(checkpoint, path)
    assert run_script("train.py", ["--data-path", assets["data"], "--resume", str(experiment), "--max-steps", "3",
                                   "--num-workers", "0", *QUIET]) == 0
    out = capsys.readouterr().out
    assert ("warning: the checkpoint's loss_weight likelihood is not applied: a velocity model's loss is never "
            "weighted (as in the original run that wrote it)") in out
    assert sorted(os.listdir(experiment / "checkpoints")) == ["0000002.pt", "0000003.pt"]


def test_a_run_that_diverges_before_its_first_checkpoint_leaves_no_folder_but_its_log(assets, sandbox, capsys):
    """Nothing to resume, so no experiment folder (`--resume` must not find it); its log.txt, the record of
    why it failed, is kept in results/failed/ and the last line says where."""
    argv = ["--data-path", assets["data"], *TINY, *QUIET, "--lr", "1e30", "--max-steps", "6"]
    assert run_script("train.py", argv) == 1
    out, err = capsys.readouterr()
    assert os.listdir("results") == ["failed"] and os.listdir("results/failed") == [f"{EXPERIMENT}.log.txt"]
    with open(f"results/failed/{EXPERIMENT}.log.txt") as handle:
        log = handle.read()
    assert "Experiment directory" in log and "non-finite" in log  # the configuration and why it stopped
    (line,) = err.splitlines()
    assert line.startswith("train.py: error: ") and "non-finite" in line and f"results/{EXPERIMENT}" in line, line
    assert f"results/failed/{EXPERIMENT}.log.txt" in line
    assert "Beginning epoch 0" in out  # the log went to stdout too


def divide_by_zero() -> None:
    """A script's main with a bug in it."""
    return 1 // 0


@pytest.mark.parametrize("world", [None, (1, 2)], ids=["plain", "torchrun-rank-1"])
def test_an_unexpected_exception_shows_its_traceback_then_one_last_line(world, sandbox, capsys, monkeypatch):
    """Not a message but a bug: the whole traceback (on every rank, rank 1 included), then one line, exit 1.
    A user's error on rank 1 stays silent there (rank 0 says it once)."""
    from sit.cli import run_main
    from sit.errors import UsageError

    if world:
        monkeypatch.setenv("RANK", str(world[0]))
        monkeypatch.setenv("WORLD_SIZE", str(world[1]))
    assert run_main(divide_by_zero, "train.py") == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and out == ""
    assert any("divide_by_zero" in line for line in lines) and "    return 1 // 0" in lines
    assert lines[-2] == "ZeroDivisionError: integer division or modulo by zero"
    assert lines[-1].startswith("train.py: error: unexpected ZeroDivisionError: integer division or modulo by zero ")
    assert "report" in lines[-1] and ("rank 1" in lines[-1]) == bool(world)

    def refuse() -> None:
        raise UsageError("--lr must be positive")

    assert run_main(refuse, "train.py") == 2
    assert capsys.readouterr().err == ("" if world else "train.py: error: --lr must be positive\n")


#################################################################################
#                       A few as real processes, concurrently                    #
#################################################################################

REAL_PROCESSES = [case for case in MISTAKES if (case.script, case.argv) in {  # one per script
    ("train.py", "--data-path {bad} --vae none --image-size 8"), ("sample.py", "ODE --ckpt {nan}"),
    ("sample_ddp.py", "ODE --ckpt {ckpt} --likelihood --data-path {bad} --sample-dir samples"),
    ("extract_features.py", "--data-path {data} --features-path {file}"), ("evaluate.py", "{text_npz} --device cpu"),
    ("export_digits.py", "{file}/digits")}]


@pytest.mark.slow
def test_real_processes_end_with_one_line_and_their_exit_code(assets, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    before = tree(assets["root"], str(tmp_path))
    processes = [subprocess.Popen([sys.executable, os.path.join(REPO, case.script), *case.command(assets)],
                                  cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for case in REAL_PROCESSES]
    for case, process in zip(REAL_PROCESSES, processes):
        _, err = process.communicate(timeout=300)
        check_outcome(case, process.returncode, err, assets)
    assert tree(assets["root"], str(tmp_path)) == before


#################################################################################
#              Damaged files from before: resampled, skipped, never counted      #
#################################################################################

def test_a_rerun_resamples_empty_garbage_cut_and_foreign_pngs(assets, sandbox, capsys):
    argv = ["ODE", "--ckpt", assets["ckpt"], "--sampling-method", "euler", "--num-sampling-steps", "2",
            "--num-fid-samples", "6", "--per-proc-batch-size", "2", "--sample-dir", "samples"]
    assert run_script("sample_ddp.py", argv) == 0
    (name,) = [entry for entry in os.listdir("samples") if os.path.isdir(os.path.join("samples", entry))]
    folder = os.path.join("samples", name)
    pngs = {index: open(os.path.join(folder, f"{index:06d}.png"), "rb").read() for index in range(6)}
    npz = np.load(folder + ".npz")["arr_0"].copy()
    os.remove(folder + ".npz")
    with open(os.path.join(folder, "000001.png"), "wb"):
        pass  # zero bytes
    with open(os.path.join(folder, "000002.png"), "wb") as handle:
        handle.write(b"garbage, not a PNG")
    with open(os.path.join(folder, "000003.png"), "wb") as handle:
        handle.write(pngs[3][:-20])  # cut short
    Image.new("RGB", (16, 16)).save(os.path.join(folder, "000004.png"))  # whole, but of another size
    capsys.readouterr()
    assert run_script("sample_ddp.py", argv) == 0
    out = capsys.readouterr().out
    assert ("warning: 4 existing PNGs are not whole 8x8 RGB images (empty, cut or foreign, e.g. "
            f"{folder}/000001.png): sampling them again") in out
    assert "2 of 6 images already exist; sampling 4 on 1 process(es)" in out
    for index in range(6):  # the same bytes as the first run: per-index seeds, whole blocks resampled
        assert open(os.path.join(folder, f"{index:06d}.png"), "rb").read() == pngs[index]
    assert np.array_equal(np.load(folder + ".npz")["arr_0"], npz)


def test_likelihood_reads_real_images_as_training_does(assets, sandbox, capsys):
    """--likelihood --data-path: the listing and reader of train.py; unreadable images and FIFOs are skipped
    with a warning (no traceback, no hang), links to files already listed count once."""
    data = make_image_folder(str(sandbox / "real"), num_classes=2, per_class=2, size=8)
    (sandbox / "real" / "class0" / "0-empty.png").write_bytes(b"")
    os.mkfifo(sandbox / "real" / "class1" / "pipe.png")
    os.symlink(os.path.join("..", "class0", "0.png"), sandbox / "real" / "class1" / "again.png")
    argv = ["ODE", "--ckpt", assets["ckpt"], "--likelihood", "--data-path", data, "--sampling-method", "euler",
            "--num-sampling-steps", "2", "--num-fid-samples", "10", "--per-proc-batch-size", "2",
            "--sample-dir", "samples"]
    assert run_script("sample_ddp.py", argv) == 0
    out, err = capsys.readouterr()
    empty = os.path.join(data, "class0", "0-empty.png")
    warnings_shown = [line for line in err.splitlines() if "warning" in line.lower()]  # besides the progress bar
    assert warnings_shown == [f"warning: skipping unreadable image {empty} (not an image file Pillow can identify: "
                              f"empty, damaged or another kind of file)"]
    assert "Traceback" not in err
    assert f"skipped 2 entries, each real image file is read once: 1 not a regular file" in out
    (csv_path,) = [os.path.join(parent, name) for parent, _, names in os.walk("samples") for name in names
                   if name == "likelihood.csv"]
    with open(csv_path) as handle:
        rows = [line.split(",")[:2] for line in handle.read().splitlines()[1:]]
    assert rows == [["1", "0"], ["2", "0"], ["3", "1"], ["4", "1"]]  # index 0 (the empty file) left out


def test_a_checkpoints_own_setting_is_named_as_the_checkpoints(assets, sandbox, capsys, monkeypatch):
    """Messages say where a value came from: a resumed checkpoint's global batch size or VAE folder is
    "the checkpoint's", never a flag the user did not give."""
    experiment = sandbox / "results" / EXPERIMENT
    shutil.copytree(assets["experiment"], experiment)
    argv = ["--data-path", assets["data"], "--resume", str(experiment), "--max-steps", "9"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert run_script("train.py", argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("train.py: error: the checkpoint's global_batch_size 4 ") and "--global-batch-size" in line
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    path = experiment / "checkpoints" / "0000002.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["args"]["vae"] = "/gone/vae"
    torch.save(checkpoint, path)
    before = tree(str(sandbox))
    assert run_script("train.py", argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("train.py: error: the checkpoint's vae /gone/vae ") and "--vae" in line, line
    assert tree(str(sandbox)) == before


def test_training_flags_that_change_nothing_are_warned_about(assets, sandbox):
    import train
    from sit.errors import UsageError
    from sit.training.launch import plan_training

    def warnings_of(argv: list) -> list:
        args, explicit = train.parse_args(argv)
        return plan_training(vars(args), explicit, 1).warnings

    no_dropout = json.dumps({"depth": 1, "hidden_size": 32, "num_heads": 2, "class_dropout_prob": 0})
    argv = ["--data-path", assets["data"], *TINY, "--model-config", no_dropout, "--max-steps", "3",
            "--sample-every", "5", "--fid-every", "4", "--fid-ref", assets["npz"]]
    with pytest.raises(UsageError, match="mu/sigma"):  # the FID reference is read first
        warnings_of(argv)
    assert warnings_of(argv[:-4]) == [
        "--sample-every 5 but the run ends at --max-steps 3: no preview grid is made",
        "the preview grids are not guided: the model has no null class (class_dropout_prob 0), so the default "
        "--cfg-scale 4.0 does not apply"]
