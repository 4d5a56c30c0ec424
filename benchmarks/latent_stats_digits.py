"""Evidence for per-channel latent statistics on the CPU, offline: SiT trained in a real learned latent
space, its latents normalised by the measured per-channel statistics or by the constant scale.

1. export scikit-learn's 1,797 8x8 digits as an ImageFolder (export_digits.py);
2. fit a tiny diffusers AutoencoderKL (downsampling 8, 4 latent channels, KL weight 1e-6 as the LDM
   recipe of SD's VAE) on the digits as train.py reads them at 32 px (8 -> 32 bicubic), saved as a
   diffusers folder with diffusers' default scaling_factor 0.18215: `--vae <folder>` then reaches it
   through the real code path (sit.latents), 4x4x4 latents;
3. extract_features.py into that latent space (it measures the per-channel statistics);
4. for each seed, train.py from those features twice with the same data order and initial weights:
   --latent-norm constant (x 0.18215, what the project does with any AutoencoderKL folder) and
   --latent-norm per-channel ((z - mean_c) / std_c);
5. sample --num-samples images from the EMA weights (Euler 50 steps, cfg 1.5, per-index noise and labels
   as sample_ddp.py), decoded by sample.py's decoder (the checkpoint's statistics, no flag), brought back
   to 8x8 grey (4x4 box average), and graded by the digits SVC of benchmarks/repa_digits.py; the same
   grading of the real digits passed through the autoencoder is the ceiling.

    python benchmarks/latent_stats_digits.py --ae-steps 600 --steps 400,800 --seeds 0,1,2

The autoencoder is fitted once into <workdir>/digits_ae (delete it to fit again: about 9 minutes here).

Prints the statistics and one table (mean and spread over the seeds); writes them, with every run's
numbers, to <workdir>/latent_stats_digits.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import export_digits  # noqa: E402
from repa_digits import CFG_SCALE, NUM_CLASSES, SAMPLE_SEED, SAMPLING_STEPS, digit_classifier, summary  # noqa: E402
from sit.checkpoint import load_model  # noqa: E402
from sit.config import GuidanceConfig  # noqa: E402
from sit.data.features import read_meta  # noqa: E402
from sit.data.images import TrainImageFolder  # noqa: E402
from sit.cli import DefaultsInHelp  # noqa: E402
from sit.files import atomic_json  # noqa: E402
from sit.generation import guided_sample, noise_and_labels  # noqa: E402
from sit.sampling.loading import load_decoder  # noqa: E402
from sit.latents import latent_shape  # noqa: E402
from transport import Sampler, create_transport  # noqa: E402

IMAGE_SIZE = 32  # 8x8 digits read at 32 px: 4x4 latents after the autoencoder's downsampling by 8
AE_WIDTHS, AE_GROUPS, KL_WEIGHT = (8, 16, 32, 32), 8, 1e-6
MODEL_CONFIG = {"patch_size": 1, "hidden_size": 64, "depth": 4, "num_heads": 4, "learn_sigma": False}
TRAIN_FLAGS = ["--image-size", str(IMAGE_SIZE), "--num-classes", str(NUM_CLASSES), "--no-random-flip",
               "--model", "SiT-S/2", "--model-config", json.dumps(MODEL_CONFIG), "--lr", "2e-3", "--ema-decay", "0.99",
               "--global-batch-size", "128", "--num-workers", "0", "--log-every", "100", "--sample-every", "1000000"]
NORMS = ("constant", "per-channel")


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run(command: list[str], what: str) -> None:
    result = subprocess.run(command, env=subprocess_env(), text=True, capture_output=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{what}: exit {result.returncode}\n{result.stderr[-3000:]}")


def digits_at_size(folder: str) -> tuple[torch.Tensor, np.ndarray]:
    """The exported digits as train.py and extract_features.py read them: (N, 3, 32, 32) in [-1, 1], labels."""
    dataset = TrainImageFolder(folder, IMAGE_SIZE, random_flip=False)
    images = torch.stack([dataset[index][0] for index in range(len(dataset))])  # (N, 3, 32, 32)
    return images, np.array([dataset[index][1] for index in range(len(dataset))])


def fit_autoencoder(path: str, images: torch.Tensor, steps: int, seed: int = 0) -> dict:
    """Fit the tiny AutoencoderKL (Adam, MSE + KL_WEIGHT x KL) and save it as a diffusers folder; returns
    its final reconstruction MSE on all digits (posterior means)."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=AE_WIDTHS, layers_per_block=1,
                        latent_channels=4, norm_num_groups=AE_GROUPS, sample_size=IMAGE_SIZE)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        batch = images[torch.randint(0, len(images), (32,))]
        posterior = vae.encode(batch).latent_dist
        loss = torch.nn.functional.mse_loss(vae.decode(posterior.sample()).sample, batch) \
            + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval()
    vae.save_pretrained(path)
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(images).latent_dist.mean).sample
    return {"mse": float(torch.nn.functional.mse_loss(reconstruction, images))}


def graded(classifier, images: torch.Tensor, labels: np.ndarray) -> float:
    """SVC accuracy of (N, 3, 32, 32) images in [-1, 1] as 8x8 grey digits (4x4 box average, 0..16 levels)."""
    grey = ((images.clamp(-1, 1) + 1) * 127.5).mean(dim=1, keepdim=True)           # (N, 1, 32, 32) 0..255
    small = torch.nn.functional.avg_pool2d(grey, 4).reshape(len(images), 64)         # (N, 64)
    return float(np.mean(classifier.predict(small.double().numpy() / 255.0 * 16) == labels))


def train_run(workdir: str, features: str, seed: int, norm: str, steps: list[int]) -> str:
    """One train.py run from the features; returns its checkpoints folder."""
    results = os.path.join(workdir, "results", f"{norm}-seed{seed}")
    run([sys.executable, "train.py", "--feature-path", features, "--results-dir", results, *TRAIN_FLAGS,
         "--global-seed", str(seed), "--max-steps", str(max(steps)), "--ckpt-every", str(int(np.gcd.reduce(steps))),
         "--latent-norm", norm], f"train.py {norm} seed {seed}")
    (experiment,) = os.listdir(results)
    return os.path.join(results, experiment, "checkpoints")


@torch.no_grad()
def sample_accuracy(checkpoint: str, autoencoder: str, num_samples: int, classifier) -> float:
    """Class accuracy of the EMA model's decoded samples, decoded as sample.py decodes (the checkpoint's statistics)."""
    model, info = load_model(checkpoint)
    space = load_decoder(autoencoder, torch.device("cpu"), info["latent_statistics"])
    z, y = noise_and_labels(range(num_samples), SAMPLE_SEED, latent_shape(model.config), NUM_CLASSES)
    sample_fn = Sampler(create_transport()).sample_ode(sampling_method="euler", num_steps=SAMPLING_STEPS,
                                                       keep_trajectory=False)
    latents = guided_sample(sample_fn, model, z, y, GuidanceConfig(scale=CFG_SCALE))  # (N, 4, 4, 4)
    return graded(classifier, space.decode(latents), y.numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsInHelp)
    parser.add_argument("--ae-steps", type=int, default=600, help="training steps of the digits autoencoder")
    parser.add_argument("--steps", type=str, default="400,800", help="step counts to evaluate (the last: run length)")
    parser.add_argument("--seeds", type=str, default="0,1,2", help="comma-separated seeds: one run per normalisation each")
    parser.add_argument("--num-samples", type=int, default=500, help="decoded EMA samples graded per checkpoint")
    parser.add_argument("--workdir", type=str, default="results/latent_stats_digits", help="folder of the runs and results")
    args = parser.parse_args()
    steps, seeds = sorted(int(s) for s in args.steps.split(",")), [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    started = time.time()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    digits = os.path.join(workdir, "digits")
    if not os.path.isdir(digits):
        export_digits.main([digits])
    images, labels = digits_at_size(digits)
    autoencoder = os.path.join(workdir, "digits_ae")
    fit = None if os.path.isdir(autoencoder) else fit_autoencoder(autoencoder, images, args.ae_steps)
    classifier, svc_accuracy = digit_classifier()
    space = load_decoder(autoencoder, torch.device("cpu"))  # the constant scale's space: encode and decode back
    with torch.no_grad():
        ceiling = graded(classifier, space.decode(space.encode(images, sample=False)), labels)
    fitted = "fitted before (kept)" if fit is None else f"{args.ae_steps} steps, reconstruction MSE {fit['mse']:.4f}"
    print(f"autoencoder: {fitted}; SVC accuracy of its "
          f"reconstructions {ceiling:.3f} (real digits at 32 px: {graded(classifier, images, labels):.3f}) "
          f"({time.time() - started:.0f}s)", flush=True)

    features = os.path.join(workdir, "features")
    run([sys.executable, "extract_features.py", "--data-path", digits, "--features-path", features, "--image-size",
         str(IMAGE_SIZE), "--vae", autoencoder, "--batch-size", "128", "--block-size", "512", "--num-workers", "0",
         "--float32"], "extract_features.py")
    statistics = read_meta(features)["latent_statistics"]
    scale = space.normalisation.scale
    print(f"raw latent statistics per channel: mean {np.round(statistics['mean'], 3).tolist()}, std "
          f"{np.round(statistics['std'], 3).tolist()}; x {scale}: mean "
          f"{np.round(np.multiply(statistics['mean'], scale), 3).tolist()}, std "
          f"{np.round(np.multiply(statistics['std'], scale), 3).tolist()} ({time.time() - started:.0f}s)", flush=True)

    results = []
    for seed in seeds:
        for norm in NORMS:
            folder = train_run(workdir, features, seed, norm, steps)
            for step in steps:
                accuracy = sample_accuracy(os.path.join(folder, f"{step:07d}.pt"), autoencoder, args.num_samples,
                                           classifier)
                results.append(dict(seed=seed, norm=norm, step=step, accuracy=accuracy))
                print(f"seed {seed} {norm} step {step}: accuracy {accuracy:.3f} ({time.time() - started:.0f}s)",
                      flush=True)
    lines = [f"| steps | accuracy, constant x {scale} | accuracy, per-channel statistics |", "|---|---|---|"]
    for step in steps:
        cells = {norm: [r["accuracy"] for r in results if r["norm"] == norm and r["step"] == step] for norm in NORMS}
        lines.append(f"| {step} | {summary(cells['constant'])} | {summary(cells['per-channel'])} |")
    table = "\n".join(lines)
    print(f"\n{len(seeds)} seeds, {args.num_samples} samples each (Euler {SAMPLING_STEPS}, cfg {CFG_SCALE}); SVC "
          f"held-out accuracy on real digits {svc_accuracy:.3f}; on the autoencoder's reconstructions {ceiling:.3f}\n"
          f"{table}\ntotal {time.time() - started:.0f}s", flush=True)
    atomic_json(os.path.join(workdir, "latent_stats_digits.json"),
                dict(table=table, runs=results, statistics=statistics, constant_scale=scale, autoencoder=fit,
                     reconstruction_accuracy=ceiling, svc_accuracy=svc_accuracy, args=vars(args)))


if __name__ == "__main__":
    main()
