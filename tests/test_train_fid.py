"""FID while training: train.py --fid-every logs the FID that sample_ddp.py + evaluate give offline.

A randomly initialised Inception of the real architecture stands in for the published weights.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from conftest import random_inception_state_dict
from sit.metrics import FIDMonitor

TINY = ["--model", "SiT-S/2", "--model-config", json.dumps({"depth": 1, "hidden_size": 32, "num_heads": 2}),
        "--image-size", "32", "--num-classes", "2"]
FID_LINE = re.compile(r"\(step=(\d{7})\) FID-(\d+): ([0-9.]+)")


def run(command: list, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, *command], cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory, image_folder):
    """Random Inception weights and reference statistics of the training images (by evaluate.py)."""
    root = tmp_path_factory.mktemp("fid")
    weights = str(root / "inception.pth")
    torch.save(random_inception_state_dict(seed=0), weights)
    images = [np.asarray(Image.open(os.path.join(folder, name)).convert("RGB").resize((32, 32)))
              for folder, _, names in os.walk(image_folder) for name in sorted(names)]
    np.savez(str(root / "ref.npz"), arr_0=np.stack(images))
    run([os.path.join(REPO, "evaluate.py"), str(root / "ref.npz"), "--inception-weights", weights, "--batch-size", "8"], str(root))
    return root, weights, str(root / "ref.stats.npz")


@pytest.mark.slow
def test_training_fid_equals_offline_fid(reference, image_folder, tiny_vae):
    root, weights, stats = reference
    results = str(root / "results")
    run([os.path.join(REPO, "train.py"), "--data-path", image_folder, "--results-dir", results, "--vae", tiny_vae, *TINY,
         "--global-batch-size", "4", "--num-workers", "0", "--max-steps", "2", "--log-every", "1",
         "--ckpt-every", "2", "--sample-every", "1000", "--fid-every", "2", "--fid-num-samples", "5",
         "--fid-steps", "4", "--fid-ref", stats, "--fid-inception-weights", weights], str(root))
    (experiment,) = os.listdir(results)
    with open(os.path.join(results, experiment, "log.txt")) as handle:
        (step, count, logged_fid), = FID_LINE.findall(handle.read())
    assert (int(step), int(count)) == (2, 5)

    # The same images offline: the step-2 EMA, the same per-index noise, Euler with 4 steps.
    checkpoint = os.path.join(results, experiment, "checkpoints", "0000002.pt")
    run([os.path.join(REPO, "sample_ddp.py"), "ODE", "--ckpt", checkpoint, "--sampling-method", "euler",
         "--num-sampling-steps", "4", "--num-fid-samples", "5", "--per-proc-batch-size", "2",
         "--sample-dir", str(root / "samples")], str(root))
    (npz,) = [name for name in os.listdir(root / "samples") if name.endswith(".npz")]
    samples = np.load(root / "samples" / npz)["arr_0"]  # (5, 32, 32, 3) uint8
    monitor = FIDMonitor(stats, "cpu", weights_path=weights)
    monitor.update(torch.from_numpy(samples).permute(0, 3, 1, 2))
    offline_fid = monitor.compute()
    assert np.isfinite(offline_fid) and offline_fid > 0
    assert float(logged_fid) == pytest.approx(offline_fid, rel=1e-3)


def test_fid_every_without_reference_is_refused(image_folder, tiny_vae, tmp_path):
    command = [sys.executable, os.path.join(REPO, "train.py"), "--data-path", image_folder, "--vae", tiny_vae, *TINY,
               "--results-dir", str(tmp_path), "--fid-every", "10"]
    result = subprocess.run(command, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--fid-every needs --fid-ref" in result.stderr
    assert "Traceback" not in result.stderr


def test_fid_monitor_leaves_the_training_rng_untouched(tmp_path):
    """Building the Inception network draws random initial weights; make_fid_monitor must not take
    them from the training RNG (a resumed run restores that RNG first, a fresh one has just seeded it)."""
    from sit.training.fid import make_fid_monitor

    weights, stats = str(tmp_path / "inception.pth"), str(tmp_path / "ref.stats.npz")
    torch.save(random_inception_state_dict(seed=0), weights)
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(7), sigma_s=np.eye(7))
    torch.manual_seed(5)
    monitor = make_fid_monitor(stats, torch.device("cpu"), weights)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # the same draws as without the monitor
    assert isinstance(monitor, FIDMonitor)


def test_fid_guidance_without_label_dropout_is_refused(image_folder, tiny_vae, tmp_path):
    """--fid-cfg-scale > 1 needs the null class, which only a model with label dropout has."""
    import train
    from sit.errors import UsageError
    from sit.training.settings import check_train_config
    from train_configs import resolve_train_config

    no_dropout = json.dumps({"depth": 1, "hidden_size": 32, "num_heads": 2, "class_dropout_prob": 0})
    argv = ["--data-path", image_folder, "--vae", tiny_vae, *TINY, "--model-config", no_dropout,
            "--results-dir", str(tmp_path), "--fid-every", "10",
            "--fid-ref", os.path.join(tiny_vae, "config.json"),  # any file: only its existence is checked here
            "--fid-cfg-scale", "4"]
    args, explicit = train.parse_args(argv)
    config, _ = resolve_train_config(vars(args), explicit)
    with pytest.raises(UsageError) as error:
        check_train_config(config, 1)
    assert str(error.value) == ("--fid-cfg-scale 4.0 needs a model with label dropout (its "
                                "null class), but class_dropout_prob is 0: use --fid-cfg-scale 1")
    args, explicit = train.parse_args(argv[:-2])  # no guidance: accepted
    check_train_config(resolve_train_config(vars(args), explicit)[0], 1)
