"""Pixel-space SiT (--vae none): image bits/dim against a closed form, and the scripts end to end.

The closed-form check: 8-bit images drawn from a Gaussian N(mu, s^2) on the model's [-1, 1] scale,
and a "model" whose velocity is the exact field of that data distribution on the Linear path. Run
through sample_ddp's own likelihood code (parse its flags, build its likelihood function, score
with sit.sampling.likelihood's PixelMeasure), the bits/dim must equal the Gaussian's closed-form
value for the same dequantized images.
"""
import argparse
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sample_ddp
import train
from conftest import REPO, make_image_folder, assert_names
from test_sample import write_checkpoint
from sit.checkpoint import settings_of
from sit.config import TransportConfig
from sit.dequantize import dequantize, image_bits_per_dim
from sit.errors import UsageError
from sit.latents import as_latent_space
from sit.sampling.likelihood import PixelMeasure, build_likelihood_fn
from sit.sampling.settings import resolve_vae

MEAN, STD = 0.1, 0.3           # the data distribution, per pixel, on the [-1, 1] scale
IMAGE_SHAPE = (3, 4, 4)        # D = 48


class GaussianVelocity(torch.nn.Module):
    """The exact velocity E[x1 - x0 | x_t] of data N(MEAN, STD^2) per pixel on the Linear path
    x_t = t x1 + (1 - t) x0, x0 ~ N(0, 1):  MEAN + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) (x - t MEAN)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, 1, 1, 1)  # (N, 1, 1, 1)
        variance = t ** 2 * STD ** 2 + (1 - t) ** 2
        return MEAN + (t * STD ** 2 - (1 - t)) / variance * (x - t * MEAN)


def gaussian_images(count: int, seed: int = 0) -> torch.Tensor:
    """uint8 (count, 3, 4, 4): samples of N(MEAN, STD^2) quantized to 256 bins of [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    x = MEAN + STD * torch.randn(count, *IMAGE_SHAPE, generator=generator, dtype=torch.float64)
    return torch.floor((x + 1) * 128).clamp(0, 255).to(torch.uint8)


def closed_form_bits_per_dim(x: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Bits/dim of the dequantized images x (N, ...) float64 under the Gaussian, exactly."""
    log_density = -0.5 * ((x - MEAN) / STD) ** 2 - math.log(STD * math.sqrt(2 * math.pi))
    return image_bits_per_dim(log_density.flatten(1).sum(dim=1), log_q, x[0].numel())


def likelihood_config(*flags: str):
    """sample_ddp's SamplingConfig of these flags (the transport: as for a checkpoint without settings)."""
    _, config = sample_ddp.parse_args(["ODE", "--likelihood", "--ckpt", "unused.pt", *flags])
    return config


@pytest.mark.parametrize("dequantization", ["uniform", "gaussian", "none"])
@pytest.mark.parametrize("divergence", [["--exact-trace"], ["--num-probes", "2"]])
def test_image_bits_per_dim_of_gaussian_data_match_the_closed_form(dequantization, divergence):
    config = likelihood_config("--dequantize", dequantization, *divergence)
    likelihood_fn = build_likelihood_fn(TransportConfig(), config.sampler, config.likelihood)
    images = gaussian_images(8)
    labels = torch.zeros(8, dtype=torch.long)
    torch.manual_seed(0)
    measure = PixelMeasure(device=torch.device("cpu"), dequantization=config.likelihood.dequantization)
    generator = torch.Generator().manual_seed(1)
    logp_x, nll, bits = measure.scores(images, labels, GaussianVelocity(), likelihood_fn, generator)
    # the same dequantization noise, recomputed
    x, log_q = dequantize(images, dequantization, torch.Generator().manual_seed(1))
    expected = closed_form_bits_per_dim(x, log_q)
    assert bits.shape == (8,) and bits.dtype == torch.float64
    assert torch.allclose(bits, expected, rtol=0.01)          # the requirement: within 1%
    assert torch.allclose(bits, expected, atol=2e-3)          # and in fact to about a thousandth of a bit
    assert torch.allclose(nll, bits * 48 * math.log(2))
    if dequantization == "none":  # bin centres, no noise density: x is known exactly
        assert torch.equal(x, 2 * (images.double() + 0.5) / 256 - 1)
        assert torch.equal(log_q, torch.zeros(8, dtype=torch.float64))
    # a Gaussian of std 0.3 on [-1, 1] spans about 0.3 * 128 = 38 bins: log2(38 sqrt(2 pi e)) ~ 7.3 bits/dim
    assert 6.5 < bits.mean().item() < 8.0


def test_uniform_dequantization_bounds_the_discrete_likelihood():
    """E_u[bits/dim] >= the exact bits/dim of the 8-bit images (the bound), and close to it."""
    images = gaussian_images(4)
    bins = images.double()
    # exact discrete probability of each bin under the Gaussian: CDF difference, per pixel
    edges_low, edges_high = 2 * bins / 256 - 1, 2 * (bins + 1) / 256 - 1
    normal = torch.distributions.Normal(torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64))
    exact_bits = -torch.log2(normal.cdf(edges_high) - normal.cdf(edges_low)).flatten(1).mean(dim=1)
    generator = torch.Generator().manual_seed(0)
    bounds = torch.stack([closed_form_bits_per_dim(*dequantize(images, "uniform", generator)) for _ in range(200)])
    assert torch.all(bounds.mean(dim=0) >= exact_bits - 1e-3)
    assert torch.allclose(bounds.mean(dim=0), exact_bits, atol=0.01)


def test_likelihood_flags_are_checked():
    for argv, message in [(["ODE", "--dequantize", "uniform"], "--dequantize is read only with --likelihood"),
                          (["ODE", "--exact-trace"], "--exact-trace is read only with --likelihood"),
                          (["ODE", "--likelihood", "--exact-trace", "--num-probes", "3"], "drop --num-probes"),
                          (["ODE", "--likelihood", "--dequantize", "poisson"], "invalid choice")]:
        result = subprocess.run([sys.executable, os.path.join(REPO, "sample_ddp.py"), *argv], capture_output=True,
                                text=True, cwd=REPO)
        assert result.returncode == 2 and message in result.stderr, (argv, result.stderr)


def test_vae_flag_is_checked_against_the_checkpoint_and_pixels_are_clamped():
    pixel_info = {"vae": "none", "in_channels": 3, "pixel_space": True}
    latent_info = {"vae": "ema", "in_channels": 4, "pixel_space": False}
    assert resolve_vae(None, pixel_info, default="ema") is None
    assert resolve_vae("none", pixel_info, default="ema") is None
    assert resolve_vae(None, latent_info, default="mse") == "mse"
    with pytest.raises(UsageError, match="--vae ema but the checkpoint is a pixel-space model"):
        resolve_vae("ema", pixel_info, default="ema")
    with pytest.raises(UsageError, match="--vae none .*latents"):
        resolve_vae("none", latent_info, default="ema")
    outputs = torch.tensor([-1.7, -0.25, 0.5, 1.2])
    assert torch.equal(as_latent_space(None).decode(outputs), torch.tensor([-1.0, -0.25, 0.5, 1.0]))


#################################################################################
#                          train.py settings (no subprocess)                    #
#################################################################################

def test_pixel_model_config_and_image_size_checks():
    from sit.errors import UsageError
    from sit.training.settings import check_train_config
    from train_configs import resolve_train_config

    def config_for(argv):
        args, explicit = train.parse_args(argv)
        config, _ = resolve_train_config(vars(args), explicit)
        return config

    config = config_for(["--data-path", "x", "--vae", "none", "--image-size", "12", "--model", "SiT-S/2"])
    kwargs = config.model.sit_kwargs()
    assert (kwargs["input_size"], kwargs["in_channels"], kwargs["patch_size"]) == (12, 3, 2)
    check_train_config(config, 1)  # 12 is no multiple of 8, fine in pixel space
    config = config_for(["--data-path", "x", "--vae", "none", "--image-size", "12", "--model", "SiT-S/8"])
    with pytest.raises(UsageError, match="--image-size 12 .*patch"):
        check_train_config(config, 1)
    kwargs = config_for(["--data-path", "x", "--image-size", "256", "--model", "SiT-S/2"]).model.sit_kwargs()
    assert kwargs["in_channels"] == 4 and kwargs["input_size"] == 32


def test_lr_and_ema_decay_come_from_the_checkpoint_unless_given():
    from sit.checkpoint import settings_of
    from train_configs import resolve_train_config

    def resolve(argv, checkpoint):
        args, explicit = train.parse_args(argv)
        return resolve_train_config(vars(args), explicit, settings_of(checkpoint), source="the checkpoint c.pt",
                                    train_steps=checkpoint["train_steps"])

    stored = argparse.Namespace(lr=1e-3, ema_decay=0.99, global_batch_size=8, global_seed=0, random_flip=False)
    checkpoint = {"args": stored, "train_steps": 40}
    args, explicit = train.parse_args(["--data-path", "x"])
    assert (args.lr, args.ema_decay, args.random_flip) == (1e-4, 0.9999, True)  # the defaults
    config, warnings = resolve(["--data-path", "x"], checkpoint)
    assert warnings == []
    assert (config.optim.lr, config.optim.ema_decay, config.data.random_flip) == (1e-3, 0.99, False)
    config, warnings = resolve(["--data-path", "x", "--lr", "5e-4", "--ema-decay", "0.99"], checkpoint)
    assert warnings == ["--lr 0.0005 replaces the checkpoint's 0.001 from step 40 on: the run will differ from "
                        "an uninterrupted one"]
    assert (config.optim.lr, config.optim.ema_decay) == (5e-4, 0.99)
    older = {"args": argparse.Namespace(global_batch_size=8, global_seed=0), "train_steps": 1}
    config, warnings = resolve(["--data-path", "x"], older)
    assert warnings == []
    assert (config.optim.lr, config.optim.ema_decay) == (1e-4, 0.9999)  # what older checkpoints were trained with


@pytest.mark.parametrize("flag, value, message", [("--lr", "0", "must be a positive number"),
                                                  ("--ema-decay", "1", "must be in [0, 1)")])
def test_bad_lr_and_ema_decay(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--data-path", "x", flag, value])
    assert message in capsys.readouterr().err


#################################################################################
#                        The scripts end to end (subprocess)                    #
#################################################################################

def run_script(script: str, args: list, cwd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd, env=env, text=True,
                            capture_output=True, timeout=timeout)
    return result


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


@pytest.mark.slow
def test_pixel_space_train_sample_and_likelihood_scripts(tmp_path):
    """train.py --vae none at 12 px (no multiple of 8) -> a checkpoint that says so -> sample.py and
    sample_ddp.py with no VAE flag -> PNGs of 12x12 -> bits/dim of the real images in a CSV."""
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=4, size=16)
    config = json.dumps({"depth": 1, "hidden_size": 32, "num_heads": 2})
    result = run_script("train.py", ["--data-path", data, "--results-dir", str(tmp_path / "results"), "--vae", "none",
                                     "--image-size", "12", "--model", "SiT-S/2", "--model-config", config,
                                     "--num-classes", "2", "--global-batch-size", "4", "--max-steps", "3",
                                     "--num-workers", "0", "--log-every", "1", "--sample-every", "3",
                                     "--ckpt-every", "100", "--lr", "2e-3", "--ema-decay", "0.5"], str(tmp_path))
    assert_ok(result)
    (experiment,) = os.listdir(tmp_path / "results")
    ckpt = str(tmp_path / "results" / experiment / "checkpoints" / "0000003.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    stored = settings_of(checkpoint)  # a plain dict (older train.py: a Namespace)
    assert stored["vae"] == "none" and stored["lr"] == 2e-3 and stored["ema_decay"] == 0.5
    assert checkpoint["model_config"]["in_channels"] == 3 and checkpoint["model_config"]["input_size"] == 12
    assert all(group["lr"] == 2e-3 for group in checkpoint["opt"]["param_groups"])
    preview = Image.open(tmp_path / "results" / experiment / "samples" / "0000003.png")
    assert preview.size == (4 * 12 + 5 * 2, 4 * 12 + 5 * 2)  # 4x4 grid of 12 px images, 2 px padding

    result = run_script("sample.py", ["ODE", "--ckpt", ckpt, "--class-labels", "0,1", "--num-sampling-steps", "4",
                                      "--sampling-method", "euler", "--output", str(tmp_path / "grid.png")], str(tmp_path))
    assert_ok(result)
    assert Image.open(tmp_path / "grid.png").size == (2 * 12 + 3 * 2, 12 + 2 * 2)

    samples = ["ODE", "--ckpt", ckpt, "--sample-dir", str(tmp_path / "samples"), "--num-sampling-steps", "4",
               "--sampling-method", "euler", "--per-proc-batch-size", "4"]
    result = run_script("sample_ddp.py", samples + ["--num-fid-samples", "4"], str(tmp_path))
    assert_ok(result)
    (npz,) = [name for name in os.listdir(tmp_path / "samples") if name.endswith(".npz")]
    assert "vae-pixels" in npz
    assert np.load(tmp_path / "samples" / npz)["arr_0"].shape == (4, 12, 12, 3)

    result = run_script("sample_ddp.py", samples + ["--likelihood", "--data-path", data, "--exact-trace",
                                                    "--num-fid-samples", "8"], str(tmp_path))
    assert_ok(result)
    assert "8-bit images of" in result.stderr + result.stdout and "uniform dequantization, exact trace" in result.stderr + result.stdout
    (folder,) = [name for name in os.listdir(tmp_path / "samples") if "likelihood" in name]
    assert folder.endswith("-deq-uniform-exact-trace")
    with open(tmp_path / "samples" / folder / "likelihood.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["index"]) for row in rows] == list(range(8))
    assert [int(row["label"]) for row in rows] == [0] * 4 + [1] * 4
    for row in rows:
        bits, nll = float(row["bits_per_dim"]), float(row["nll_image_nats"])
        assert math.isclose(nll, bits * 12 * 12 * 3 * math.log(2), rel_tol=1e-9)
        assert 0 < bits < 30 and math.isfinite(float(row["logp_x_nats"]))

    # generated samples, quantized to uint8 as the PNGs, then dequantized
    result = run_script("sample_ddp.py", samples + ["--likelihood", "--dequantize", "gaussian", "--num-probes", "2",
                                                    "--num-fid-samples", "4"], str(tmp_path))
    assert_ok(result)
    assert "8-bit generated samples (gaussian dequantization, 2 Hutchinson probe(s))" in result.stderr + result.stdout
    (folder,) = [name for name in os.listdir(tmp_path / "samples") if "likelihood-generated" in name]
    assert folder.endswith("-likelihood-generated-deq-gaussian-probes-2")
    with open(tmp_path / "samples" / folder / "likelihood.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(0 < float(row["bits_per_dim"]) < 30 for row in rows)

    result = run_script("sample.py", ["ODE", "--ckpt", ckpt, "--vae", "ema", "--class-labels", "0"], str(tmp_path))
    assert result.returncode != 0 and "pixel-space model" in result.stderr and "Traceback" not in result.stderr

    # resume: the checkpoint's lr unless given; a new --lr rules from the resumed step on, with a warning
    resume = ["--data-path", data, "--results-dir", str(tmp_path / "results"), "--resume", "--num-workers", "0",
              "--log-every", "1", "--sample-every", "100", "--ckpt-every", "100"]
    assert_ok(run_script("train.py", resume + ["--max-steps", "4"], str(tmp_path)))
    assert_ok(result := run_script("train.py", resume + ["--max-steps", "5", "--lr", "1e-3"], str(tmp_path)))
    assert "--lr 0.001 replaces the checkpoint's 0.002 from step 4 on" in result.stderr + result.stdout
    with torch.serialization.safe_globals([argparse.Namespace]):
        step4, step5 = (torch.load(str(tmp_path / "results" / experiment / "checkpoints" / f"000000{step}.pt"),
                                   map_location="cpu", weights_only=True) for step in (4, 5))
    stored4, stored5 = settings_of(step4), settings_of(step5)
    assert stored4["lr"] == 2e-3 and stored4["ema_decay"] == 0.5 and stored4["vae"] == "none"
    assert all(group["lr"] == 2e-3 for group in step4["opt"]["param_groups"])
    assert stored5["lr"] == 1e-3 and all(group["lr"] == 1e-3 for group in step5["opt"]["param_groups"])


def test_explicit_image_size_needs_a_multiple_of_8_only_for_latent_models(capsys, tmp_path):
    assert sample_ddp.parse_args(["ODE", "--vae", "none", "--image-size", "12"])[1].request.image_size == 12
    for argv in (["ODE", "--image-size", "12"], ["ODE", "--image-size", "12", "--ckpt", "x.pt", "--vae", "ema"]):
        with pytest.raises(UsageError) as error:  # exit 2 from the script
            sample_ddp.parse_args(argv)  # the published models, or a VAE named: latent, known at parse time
        assert "multiple of 8 for latent models" in str(error.value)
    # with --ckpt alone, the checkpoint tells: a pixel-space one samples at 12 px without --vae none
    pixel = write_checkpoint(tmp_path / "pixel.pt", "none", in_channels=3, input_size=12, num_classes=2)
    fast = ["--num-sampling-steps", "2", "--sampling-method", "euler", "--class-labels", "0,1"]
    sample.main(["ODE", "--ckpt", pixel, "--image-size", "12", *fast, "--output", str(tmp_path / "grid.png")])
    assert Image.open(tmp_path / "grid.png").size == (2 * 12 + 3 * 2, 12 + 2 * 2)
    latent = write_checkpoint(tmp_path / "latent.pt", "ema", num_classes=2)  # 4 channels, 32 px
    with pytest.raises(UsageError, match=r"^--image-size .*latent.*32"):
        sample.main(["ODE", "--ckpt", latent, "--image-size", "12", *fast, "--output", str(tmp_path / "x.png")])
