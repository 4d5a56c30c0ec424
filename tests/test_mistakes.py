"""A new user's mistakes, as a table: every script's and the public API's bad input ends clearly.

Each command-line case runs `main(argv)` in-process under `sit.cli.run_main` (as `python script.py`
would) and asserts: the exit code, exactly one line on stderr (`<script>: error: ...`, or the one
expected warning), no traceback, the expected words in it, and that no file or folder appeared,
vanished or changed (the whole test tree, results/ and samples/ included, compared before and after).
API cases assert the exception type and the argument named. A few cases run as real processes too.
"""
from __future__ import annotations

import json
import os
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
EXPERIMENT = "000-SiT-S-2-Linear-velocity-None"


#################################################################################
#                          The files the mistakes are made with                  #
#################################################################################

@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """Data folders, a 2-step pixel-space checkpoint, its NaN copy, batches and odd files (paths by name)."""
    root = tmp_path_factory.mktemp("assets")
    paths = {"root": str(root), "tiny_config": TINY_CONFIG}
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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
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
    """A command line of `script` ({name} placeholders are assets' paths) and what it must end with."""
    script: str
    argv: tuple
    code: int
    expect: str  # words of the one stderr line

    def command(self, assets: dict) -> list[str]:
        return [part.format(**assets) for part in self.argv]


def m(script: str, argv: str, code: int, expect: str) -> Mistake:
    return Mistake(script, tuple(argv.split()), code, expect)


# a tiny pixel-space model on the 8x8 images ({tiny_config}: TINY_CONFIG, kept out of str.format's way)
T = "--data-path {data} --model SiT-S/2 --model-config {tiny_config} --vae none --image-size 8 --num-classes 2 " \
    "--num-workers 0 --global-batch-size 4"

MISTAKES = [
    # train.py: the command line
    m("train.py", "", 2, "one of the arguments --data-path --feature-path is required"),
    m("train.py", "--data-path {data} --no-such-flag", 2, "unrecognized arguments: --no-such-flag"),
    m("train.py", "--data-path {data} --model SiT-XXL/2", 2, "invalid choice: 'SiT-XXL/2'"),
    m("train.py", "--data-path {data} --cfg-scale -3", 2, "--cfg-scale: must be >= 1"),
    m("train.py", "--data-path {data} --cfg-scale nan", 2, "--cfg-scale: must be >= 1"),
    m("train.py", "--data-path {data} --fid-cfg-scale 0.5", 2, "--fid-cfg-scale: must be >= 1"),
    m("train.py", "--data-path {data} --lr 0", 2, "--lr: must be a positive number, got 0"),
    m("train.py", "--data-path {data} --lr -1e-4", 2, "--lr: must be a positive number"),
    m("train.py", "--data-path {data} --global-batch-size 0", 2, "--global-batch-size: must be a positive integer"),
    m("train.py", "--data-path {data} --ema-decay 1.5", 2, "--ema-decay: must be in [0, 1)"),
    m("train.py", "--data-path {data} --epochs 0", 2, "--epochs: must be a positive integer"),
    m("train.py", "--data-path {data} --max-steps -5", 2, "--max-steps: must be a positive integer"),
    m("train.py", "--data-path {data} --num-workers -1", 2, "--num-workers: must be >= 0"),
    m("train.py", "--data-path {data} --feature-path {data}", 2, "not allowed with argument"),
    m("train.py", "--data-path {data} --prediction velocit", 2, "invalid choice: 'velocit'"),
    m("train.py", "--data-path {data} --max-steps", 2, "--max-steps: expected one argument"),
    # train.py: settings that cannot work or would be ignored
    m("train.py", T + " --model SiT-S/2 --image-size 9", 2, "not divisible by the patch size 2"),
    m("train.py", T + " --model-config {{depth:1}}", 2, "--model-config is not valid JSON"),
    m("train.py", T + " --model-config {{\"depthh\":1}}", 2, "--model-config: unknown key(s) depthh"),
    m("train.py", T + " --model-config [1]", 2, "--model-config must be a JSON object"),
    m("train.py", T + " --train-eps 0.7", 2, "train_eps must be in [0, 0.5), got 0.7"),
    m("train.py", T + " --sample-eps -1", 2, "sample_eps must be in [0, 0.5), got -1.0"),
    m("train.py", T + " --loss-weight likelihood", 2, "--loss-weight likelihood weights only score and noise losses"),
    m("train.py", T + " --loss-weight velocity", 2, "drop --loss-weight, or pass --prediction score or noise"),
    m("train.py", T + " --fid-ref {npz}", 2, "--fid-ref is read only with --fid-every N"),
    m("train.py", T + " --fid-num-samples 10 --fid-steps 5", 2, "add --fid-every or drop --fid-num-samples, --fid-steps"),
    m("train.py", T + " --fid-every 5", 2, "--fid-every needs --fid-ref"),
    m("train.py", T + " --model-config {{\"class_dropout_prob\":0}} --cfg-scale 4", 2,
      "--cfg-scale 4.0 guides the preview grids, but this model has no null class"),
    m("train.py", T + " --sharding fsdp", 2, "--sharding fsdp shards over the processes of a torchrun job"),
    m("train.py", "--data-path {data} --vae {vae_missing}", 2, "is neither one of ema, mse, none nor a local diffusers folder"),
    m("train.py", "--data-path {data} --image-size 36", 2, "--image-size must be a multiple of 8"),
    m("train.py", T + " --results-dir {file}", 2, "--results-dir {file}: {file} is not a folder (it is a file)"),
    m("train.py", T + " --results-dir {file}/sub", 2, "is not a folder, so nothing can be created in it"),
    # train.py: data
    m("train.py", "--data-path {missing} --vae none --image-size 8", 2, "--data-path {missing} is not a folder"),
    m("train.py", "--data-path {file} --vae none --image-size 8", 2, "--data-path {file} is not a folder"),
    m("train.py", "--data-path {empty} --vae none --image-size 8", 2, "holds no class folders"),
    m("train.py", "--data-path {no_images} --vae none --image-size 8", 2, "holds no images (extensions: .jpg"),
    m("train.py", "--data-path {bad} --vae none --image-size 8", 2, "--data-path {bad}: none of its 4 images can be read"),
    m("train.py", "--data-path {data3} --vae none --image-size 8 --num-classes 2", 2,
      "has 3 class folders but --num-classes is 2: pass --num-classes 3 or more"),
    m("train.py", "--data-path {data3} --resume {experiment} --max-steps 9", 2,
      "has 3 class folders but the checkpoint's num_classes is 2"),
    m("train.py", T + " --global-batch-size 64", 2, "fewer than one global batch of 64"),
    m("train.py", "--feature-path {missing}", 2, "--feature-path"),
    # train.py: where to start from
    m("train.py", "--data-path {data} --resume x --ckpt y", 2, "pass either --ckpt or --resume, not both"),
    m("train.py", "--data-path {data} --resume {missing}", 2, "no such experiment folder or checkpoint file"),
    m("train.py", "--data-path {data} --resume --results-dir {empty}", 2, "--resume: no experiment with a checkpoint"),
    m("train.py", "--data-path {data} --ckpt {missing}.pt", 2, "no SiT checkpoint at {missing}.pt"),
    m("train.py", "--data-path {data} --ckpt {file}", 2, "is not a readable PyTorch checkpoint"),
    m("train.py", "--data-path {data} --ckpt {data}", 2, "is a folder, not a checkpoint file"),
    m("train.py", "--data-path {data} --resume {experiment} --max-steps 1", 2,
      "--max-steps 1 but the checkpoint {ckpt} is already at step 2: pass a larger --max-steps"),
    m("train.py", "--data-path {data} --resume {experiment} --max-steps 2", 0,
      "nothing to do: the checkpoint {ckpt} is already at step 2 = --max-steps"),
    m("train.py", "--data-path {data} --resume {experiment} --max-steps 4 --prediction score", 2,
      "--prediction score but the checkpoint {ckpt} was trained with --prediction velocity"),
    m("train.py", "--data-path {data} --resume {experiment} --max-steps 4 --vae ema", 2,
      "--vae ema but the checkpoint {ckpt} was trained with --vae none"),
    m("train.py", "--data-path {data} --resume {experiment}/checkpoints", 2, "no checkpoints/<step>.pt in that folder"),
    m("train.py", T + " --ckpt SiT-XL-2-256x256.pt", 2, "could not download SiT-XL-2-256x256.pt"),
    m("train.py", T.replace("--vae none --image-size 8", "--vae ema --image-size 16"), 2, "could not"),
    m("train.py", T + " --model-config {{\"depth\":0}}", 2, "--model-config: depth must be"),
    m("train.py", T + " --model-config {{\"depth\":\"2\"}}", 2, "--model-config: depth must be"),
    m("train.py", T + " --model-config {{\"class_dropout_prob\":1.5}}", 2, "--model-config: class_dropout_prob must be"),
    m("train.py", T + " --model-config {{\"learn_sigma\":1}}", 2, "--model-config: learn_sigma must be"),
    m("train.py", T + " --fid-every 5 --fid-ref {text_npz}", 2, "is not an .npz file"),
    m("train.py", T + " --fid-every 5 --fid-ref {npz} --max-steps 2", 2, "--fid-ref {npz} holds no mu/sigma statistics"),
    m("train.py", T + " --fid-every 5 --fid-ref {npz} --fid-inception-weights x.pth", 2, "holds no mu/sigma"),
    # sample.py
    m("sample.py", "", 2, "the first argument must be the sampling mode, ODE or SDE (got nothing)"),
    m("sample.py", "--ckpt {ckpt}", 2, "the first argument must be the sampling mode, ODE or SDE (got '--ckpt')"),
    m("sample.py", "ode", 2, "(got 'ode')"),
    m("sample.py", "ODE --cfg-scale 0.5", 2, "--cfg-scale: must be >= 1 (1 means no guidance), got 0.5"),
    m("sample.py", "ODE --num-sampling-steps 1", 2, "--num-sampling-steps must be at least 2, got 1"),
    m("sample.py", "ODE --num-sampling-steps 0", 2, "--num-sampling-steps: must be a positive integer"),
    m("sample.py", "ODE --likelihood", 2, "--likelihood is evaluated by sample_ddp.py"),
    m("sample.py", "ODE --cfg-interval 0.8 0.2", 2, "--cfg-interval LO HI needs LO <= HI"),
    m("sample.py", "ODE --cfg-interval 0 2", 2, "--cfg-interval: must be in [0, 1]"),
    m("sample.py", "ODE --precision fp8", 2, "invalid choice: 'fp8'"),
    m("sample.py", "ODE --no-tf32 --precision bf16", 2, "--no-tf32 means --precision fp32"),
    m("sample.py", "ODE --class-labels a,b", 2, "expected comma-separated integers"),
    m("sample.py", "ODE --class-labels=-1", 2, "expected comma-separated non-negative integers"),
    m("sample.py", "SDE --last-step-size 0", 2, "--last-step-size: must be a positive number"),
    m("sample.py", "SDE --diffusion-norm -1", 2, "--diffusion-norm: must be >= 0"),
    m("sample.py", "ODE --atol 0", 2, "--atol: must be a positive number"),
    m("sample.py", "ODE --sampling-method Euler", 2, "invalid choice: 'Euler'"),
    m("sample.py", "ODE --output {root}/grid.txt", 2, "needs an image extension that PIL can write"),
    m("sample.py", "ODE --output {root}", 2, "is a folder; name the image file to write"),
    m("sample.py", "ODE --output {file}/grid.png", 2, "{file} is not a folder"),
    m("sample.py", "ODE --image-size 36", 2, "--image-size must be a multiple of 8 for latent models"),
    m("sample.py", "ODE --ckpt {missing}.pt", 2, "no SiT checkpoint at {missing}.pt"),
    m("sample.py", "ODE --ckpt {file}", 2, "is not a readable PyTorch checkpoint"),
    m("sample.py", "ODE --ckpt {nan}", 2, "{nan} holds non-finite weights: final_layer.linear.weight has 1 NaN"),
    m("sample.py", "ODE --ckpt {ckpt} --num-classes 5", 2, "--num-classes 5 but the checkpoint has 2 classes"),
    m("sample.py", "ODE --ckpt {ckpt} --image-size 16", 2, "--image-size 16 but the checkpoint was trained at 8"),
    m("sample.py", "ODE --ckpt {ckpt} --model SiT-B/2", 2, "--model SiT-B/2 but the checkpoint holds"),
    m("sample.py", "ODE --ckpt {ckpt} --class-labels 7", 2, "class labels [7] are out of range for a model with 2 classes"),
    m("sample.py", "ODE --ckpt {ckpt}", 2, "(the default labels are ImageNet's): pass --class-labels"),
    m("sample.py", "ODE --ckpt {ckpt} --vae ema --class-labels 0", 2, "but the checkpoint is a pixel-space model"),
    m("sample.py", "ODE --ckpt {ckpt} --prediction score --class-labels 0", 2,
      "--prediction score but the checkpoint was trained with --prediction velocity"),
    m("sample.py", "ODE --ckpt hf://nobody/nothing", 2, "bad hub file 'hf://nobody/nothing'"),
    m("sample.py", "ODE --model SiT-S/4", 2, "no published checkpoint of --model SiT-S/4"),
    m("sample.py", "ODE --image-size 128", 2, "no published model at --image-size 128"),
    m("sample.py", "ODE --ckpt {experiment}", 2, "is a folder, not a checkpoint file"),
    m("sample.py", "ODE --ckpt {ckpt} --num-images 0", 2, "--num-images: must be a positive integer"),
    m("sample.py", "ODE --seed abc", 2, "--seed: invalid int value: 'abc'"),
    m("sample.py", "ODE --ckpt SiT-XL-2-256x256.pt", 2, "could not download SiT-XL-2-256x256.pt"),
    m("sample.py", "SDE --ckpt {ckpt} --class-labels 0 --diffusion-form SBDM --sample-eps 0", 2, "SBDM diverges at t=0"),
    # sample_ddp.py
    m("sample_ddp.py", "ODE --per-proc-batch-size 0", 2, "--per-proc-batch-size: must be a positive integer"),
    m("sample_ddp.py", "ODE --num-fid-samples 0", 2, "--num-fid-samples: must be a positive integer"),
    m("sample_ddp.py", "ODE --global-seed -1", 2, "--global-seed: must be >= 0"),
    m("sample_ddp.py", "--preset sit-xl", 2, "--preset 'sit-xl' does not exist"),
    m("sample_ddp.py", "ODE --preset", 2, "--preset: expected one argument"),
    m("sample_ddp.py", "SDE --likelihood", 2, "--likelihood works in ODE mode only"),
    m("sample_ddp.py", "ODE --data-path {data}", 2, "--data-path is read only with --likelihood"),
    m("sample_ddp.py", "ODE --likelihood --data-path {missing}", 2, "is not a folder"),
    m("sample_ddp.py", "ODE --likelihood --cfg-scale 2", 2, "--likelihood evaluates the unguided model"),
    m("sample_ddp.py", "ODE --dequantize uniform", 2, "--dequantize is read only with --likelihood"),
    m("sample_ddp.py", "ODE --likelihood --exact-trace --num-probes 2", 2, "--exact-trace computes the divergence without probes"),
    m("sample_ddp.py", "ODE --ckpt {nan}", 2, "holds non-finite weights"),
    m("sample_ddp.py", "ODE --ckpt {ckpt} --likelihood --data-path {bad} --sample-dir samples", 2,
      "--data-path {bad}: none of its 4 images can be read"),
    m("sample_ddp.py", "ODE --ckpt {ckpt} --likelihood --data-path {data3} --sample-dir samples", 2,
      "--data-path has 3 class folders but the model has 2 classes"),
    m("sample_ddp.py", "ODE --ckpt {ckpt} --likelihood --dequantize none --data-path {empty}", 2, "holds no class folders"),
    m("sample_ddp.py", "ODE --ckpt {ckpt} --sample-dir {file}", 1, "cannot create the sample folder {file}/"),
    m("sample_ddp.py", "ODE --ckpt {ckpt} --image-size 16", 2, "--image-size 16 but the checkpoint was trained at 8"),
    m("sample_ddp.py", "ODE --ckpt {ckpt} --cfg-scale 1.5 --model-config x", 2, "unrecognized arguments: --model-config x"),
    # extract_features.py
    m("extract_features.py", "--data-path {data}", 2, "the following arguments are required: --features-path"),
    m("extract_features.py", "--data-path {data} --features-path {file}", 2,
      "--features-path {file}: {file} is not a folder (it is a file)"),
    m("extract_features.py", "--data-path {data} --features-path {file}/sub", 2, "is not a folder, so nothing can be created"),
    m("extract_features.py", "--data-path {missing} --features-path out", 2, "--data-path {missing} is not a folder"),
    m("extract_features.py", "--data-path {bad} --features-path out --image-size 8", 2, "none of its 4 images can be read"),
    m("extract_features.py", "--data-path {data} --features-path out --image-size 12", 2, "multiple of 8"),
    m("extract_features.py", "--data-path {data} --features-path out --image-size 8 --vae {vae_missing}", 2,
      "is neither one of ema, mse nor a local diffusers folder"),
    m("extract_features.py", "--data-path {data} --features-path out --vae none", 2, "is neither one of ema, mse"),
    m("extract_features.py", "--data-path {data} --features-path out --batch-size 0", 2, "--batch-size: must be a positive"),
    m("extract_features.py", "--data-path {data} --features-path out --image-size 16", 2, "could not"),
    # evaluate.py
    m("evaluate.py", "", 2, "the following arguments are required: ref_batch"),
    m("evaluate.py", "{missing}.npz", 2, "no such file: {missing}.npz"),
    m("evaluate.py", "{text_npz} --device cpu", 2, "{text_npz} is not an .npz file (neither a zip archive nor a NumPy array"),
    m("evaluate.py", "{npz} {text_npz} --device cpu", 2, "{text_npz} is not a readable .npz file"),
    m("evaluate.py", "{npz} {grey_npz} --device cpu", 2, "must be uint8 images of shape (N, H, W, 3)"),
    m("evaluate.py", "{npz} {float_npz} --device cpu", 2, "must be uint8 images of shape (N, H, W, 3), got float32"),
    m("evaluate.py", "{npz} {none_npz} --device cpu", 2, "holds no images"),
    m("evaluate.py", "{npz} {other_npz} --device cpu", 2, "has no 'arr_0' array"),
    m("evaluate.py", "{npz} {npz} --metrics fid,bogus", 2, "--metrics 'fid,bogus': unknown metric 'bogus'"),
    m("evaluate.py", "{npz} {npz} --batch-size 0", 2, "--batch-size: must be a positive integer"),
    m("evaluate.py", "{npz} {npz} --device tpu", 2, "invalid choice: 'tpu'"),
    m("evaluate.py", "{npz} {npz} --device cpu --json {file}/m.json", 2, "--json {file}/m.json: {file} is not a folder"),
    m("evaluate.py", "{npz} {npz} --device cpu --json {root}", 2, "--json {root}: {root} is a folder"),
    m("evaluate.py", "{npz} {npz} --device cpu --dinov2-weights x.pth", 2,
      "--dinov2-weights is read only for --metrics fd_dinov2"),
    m("evaluate.py", "{npz} {npz} --device cpu --metrics fd_dinov2 --inception-weights x.pth", 2,
      "--inception-weights is read only for --metrics is, fid"),
    m("evaluate.py", "{npz} --json m.json", 2, "--json writes the metrics of a sample batch"),
    m("evaluate.py", "{npz} {npz} --metrics ,", 2, "no metric named"),
    # export_digits.py
    m("export_digits.py", "", 2, "the following arguments are required: output"),
    m("export_digits.py", "{file}", 2, "exists and is not a folder"),
    m("export_digits.py", "{file}/digits", 2, "is not a folder, so nothing can be created in it"),
    m("export_digits.py", "/proc/sit-digits", 2, "output /proc/sit-digits: cannot create its class folders"),
    m("export_digits.py", "a b", 2, "unrecognized arguments: b"),
]


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
    lines = [line for line in err.splitlines() if line.strip()]
    expect = case.expect.format(**assets)
    assert "Traceback" not in err, err
    assert code == case.code, (code, err)
    assert len(lines) == 1, err
    prefix = "" if case.code == 0 else f"{case.script}: error: "
    assert lines[0].startswith(prefix) and expect in lines[0], (expect, lines[0])


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
    import download
    from sit.checkpoint import load_model
    from transport import Sampler, create_transport

    sampler = Sampler(create_transport())
    return [
        ("find_model(None)", lambda a: download.find_model(None), TypeError, "find_model(model_name) must be"),
        ("find_model(123)", lambda a: download.find_model(123), TypeError, "got int 123"),
        ("find_model(list)", lambda a: download.find_model(["x.pt"]), TypeError, "got list"),
        ("find_model(missing)", lambda a: download.find_model(a["missing"] + ".pt"), ValueError, "no SiT checkpoint at"),
        ("find_model(text)", lambda a: download.find_model(a["file"]), ValueError, "not a readable PyTorch checkpoint"),
        ("load_model(123)", lambda a: load_model(123), TypeError, "load_model(ckpt) must be"),
        ("load_model image_size str", lambda a: load_model(a["ckpt"], image_size="8"), TypeError,
         "load_model(image_size) must be a positive int or None, got str '8'"),
        ("load_model image_size 0", lambda a: load_model(a["ckpt"], image_size=0), ValueError,
         "load_model(image_size) must be positive"),
        ("load_model image_size bool", lambda a: load_model(a["ckpt"], image_size=True), TypeError, "got bool"),
        ("load_model num_classes float", lambda a: load_model(a["ckpt"], num_classes=2.0), TypeError,
         "load_model(num_classes)"),
        ("load_model model_name int", lambda a: load_model(a["ckpt"], model_name=2), TypeError, "load_model(model_name)"),
        ("load_model model_name unknown", lambda a: load_model(a["ckpt"], model_name="SiT-M/2"), ValueError,
         "unknown --model 'SiT-M/2'"),
        ("load_model NaN", lambda a: load_model(a["nan"]), ValueError, "final_layer.linear.weight has 1 NaN"),
        ("create_transport train_eps str", lambda a: create_transport(train_eps="0.1"), TypeError,
         "train_eps must be a number, got str '0.1'"),
        ("create_transport sample_eps nan", lambda a: create_transport(sample_eps=float("nan")), ValueError,
         "sample_eps must be finite"),
        ("create_transport sample_eps 0.5", lambda a: create_transport(sample_eps=0.5), ValueError, "sample_eps must be in"),
        ("create_transport path_type int", lambda a: create_transport(path_type=1), TypeError, "path_type must be one of"),
        ("create_transport prediction typo", lambda a: create_transport(prediction="velo"), ValueError,
         "unknown prediction 'velo'"),
        ("create_transport loss_weight list", lambda a: create_transport(loss_weight=[]), TypeError, "loss_weight must be"),
        ("Sampler(str)", lambda a: Sampler("Linear"), TypeError, "transport must be a Transport"),
        ("sample_ode num_steps 1", lambda a: sampler.sample_ode(num_steps=1), ValueError, "at least 2 steps"),
        ("sample_ode num_steps str", lambda a: sampler.sample_ode(num_steps="10"), TypeError, "num_steps must be an integer"),
        ("sample_ode atol 0", lambda a: sampler.sample_ode(atol=0), ValueError, "atol must be positive"),
        ("sample_ode rtol str", lambda a: sampler.sample_ode(rtol="1e-3"), TypeError, "rtol must be a number"),
        ("sample_ode method None", lambda a: sampler.sample_ode(sampling_method=None), TypeError, "sampling_method must be"),
        ("sample_ode method typo", lambda a: sampler.sample_ode(sampling_method="Dopri5"), ValueError,
         "unknown sampling_method 'Dopri5'"),
        ("sample_ode reverse int", lambda a: sampler.sample_ode(reverse=1), TypeError, "reverse must be True or False"),
        ("sample_sde diffusion_norm", lambda a: sampler.sample_sde(diffusion_norm=-1), ValueError,
         "diffusion_norm must be at least 0"),
        ("sample_sde last_step_size 0", lambda a: sampler.sample_sde(last_step_size=0), ValueError,
         "last step size must be positive"),
        ("sample_sde num_steps float", lambda a: sampler.sample_sde(num_steps=2.0), TypeError, "num_steps must be an integer"),
        ("sample_sde last_step typo", lambda a: sampler.sample_sde(last_step="mean"), ValueError, "unknown last_step 'mean'"),
        ("sample_sde form int", lambda a: sampler.sample_sde(diffusion_form=0), TypeError, "diffusion_form must be"),
        ("likelihood num_probes 0", lambda a: sampler.sample_ode_likelihood(num_probes=0), ValueError,
         "num_probes must be at least 1"),
        ("likelihood num_probes float", lambda a: sampler.sample_ode_likelihood(num_probes=1.5), TypeError,
         "num_probes must be an integer"),
        ("likelihood exact_trace str", lambda a: sampler.sample_ode_likelihood(exact_trace="yes"), TypeError,
         "exact_trace must be True or False"),
    ]


API_NAMES = [name for name, *_ in api_cases()]


@pytest.mark.parametrize("index", range(len(API_NAMES)), ids=API_NAMES)
def test_a_mistaken_api_call_raises_naming_the_argument(index, assets, sandbox):
    _, call, error_type, expect = api_cases()[index]
    before = tree(assets["root"], str(sandbox))
    with pytest.raises(error_type) as raised:
        call(assets)
    assert expect in str(raised.value) and "\n" not in str(raised.value)
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


def test_a_run_that_diverges_before_its_first_checkpoint_leaves_no_folder(assets, sandbox, capsys):
    argv = ["--data-path", assets["data"], *TINY, *QUIET, "--lr", "1e30", "--max-steps", "6"]
    assert run_script("train.py", argv) == 1
    out, err = capsys.readouterr()
    assert not os.path.exists("results") or os.listdir("results") == []
    (line,) = err.splitlines()
    assert line.startswith("train.py: error: the loss became non-finite") and \
        line.endswith(f"stopping before any checkpoint was written, so the run's folder results/{EXPERIMENT} was removed")
    assert "Beginning epoch 0" in out  # the log went to stdout too


#################################################################################
#                       A few as real processes, concurrently                    #
#################################################################################

REAL_PROCESSES = [  # one per script (each process spends seconds importing torch)
    m("train.py", "--data-path {bad} --vae none --image-size 8 --cfg-scale 2", 2, "none of its 4 images can be read"),
    m("sample.py", "ODE --ckpt {nan}", 2, "holds non-finite weights"),
    m("sample_ddp.py", "ODE --ckpt {ckpt} --likelihood --data-path {bad}", 2, "none of its 4 images can be read"),
    m("extract_features.py", "--data-path {data} --features-path {file}", 2, "is not a folder (it is a file)"),
    m("evaluate.py", "{text_npz}", 2, "is not an .npz file"),
    m("export_digits.py", "{file}/digits", 2, "is not a folder"),
]


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
