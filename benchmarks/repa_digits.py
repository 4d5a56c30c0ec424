"""Learning evidence for representation alignment (REPA) on the CPU, offline: the digits pixel model
of the README's quick start trained with and without alignment to a small encoder.

1. export scikit-learn's 1,797 8x8 digits as an ImageFolder (export_digits.py);
2. train the stand-in for DINOv2: a tiny ViT classifier (patch 1, 64 dims, one 64-dim head as DINOv2's)
   on the digits as REPA's preprocessing shows them (sit.encoders: 8 px -> 7 px, ImageNet
   normalisation), saved as a local weights file;
3. for each seed, train the README's digits SiT (train.py --vae none --image-size 8) twice with the
   same data order and initial weights: plain, and with --repa-encoder <that file> (block 2 of 4);
4. at each step count, sample --num-samples images from the EMA weights (Euler, 50 steps, cfg 1.5,
   per-index noise and labels as sample_ddp.py) and measure the class accuracy of the SVC of
   tests/test_digits.py, and the Fréchet distance between the encoder's mean patch tokens of the
   samples and of the real digits (FD-enc; the encoder is the one REPA aligns to, so this distance
   is not independent of the method: read it beside the accuracy).

    python benchmarks/repa_digits.py --steps 100,200,400 --seeds 0,1,2 --jobs 2

Prints one table (mean and spread over the seeds) and writes it, with every run's numbers, to
<workdir>/repa_digits.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import export_digits  # noqa: E402
from sit.checkpoint import load_model  # noqa: E402
from sit.cli import DefaultsInHelp  # noqa: E402
from sit.config import GuidanceConfig  # noqa: E402
from sit.encoders import IMAGENET_MEAN, IMAGENET_STD, describe_encoder, encoder_inputs, load_encoder  # noqa: E402
from sit.files import atomic_json, atomic_torch_save  # noqa: E402
from sit.generation import guided_sample, noise_and_labels  # noqa: E402
from sit.metrics.statistics import frechet_distance  # noqa: E402
from transport import Sampler, create_transport  # noqa: E402

IMAGE_SIZE, NUM_CLASSES = 8, 10
ENCODER_INPUT = 7  # 224/256 of 8 px, as sit.encoders resizes for every encoder
MODEL_CONFIG = {"patch_size": 2, "hidden_size": 64, "depth": 4, "num_heads": 4, "learn_sigma": False}
TRAIN_FLAGS = ["--vae", "none", "--image-size", str(IMAGE_SIZE), "--num-classes", str(NUM_CLASSES), "--no-random-flip",
               "--model", "SiT-S/2", "--model-config", json.dumps(MODEL_CONFIG), "--lr", "2e-3", "--ema-decay", "0.99",
               "--global-batch-size", "128", "--num-workers", "0", "--log-every", "50", "--sample-every", "1000000"]
CFG_SCALE, SAMPLING_STEPS, SAMPLE_SEED = 1.5, 50, 0


def digits_in_unit_range() -> tuple[torch.Tensor, np.ndarray]:
    """The real digits as train.py reads them: (1797, 3, 8, 8) grey in [-1, 1], and their labels."""
    images, labels = export_digits.digits_uint8()
    pixels = torch.tensor(images, dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) / 127.5 - 1  # (N, 3, 8, 8)
    return pixels, labels


def digit_classifier():
    """The grader of tests/test_digits.py: SVC(gamma=0.001) on the digits' 64 grey levels 0..16, fitted
    on all of them; also the held-out accuracy of the same SVC fitted on the first 1,200."""
    from sklearn.svm import SVC

    images, labels = export_digits.digits_uint8()
    features = images.reshape(len(images), 64) / 255.0 * 16
    held_out = SVC(gamma=0.001).fit(features[:1200], labels[:1200]).score(features[1200:], labels[1200:])
    return SVC(gamma=0.001).fit(features, labels), held_out


def train_encoder(path: str, steps: int = 800, seed: int = 0) -> float:
    """Train the stand-in encoder (a ViT classifier on REPA's view of the digits: one-cycle AdamW, its
    position embedding started from 2-D sin-cos, which a 7 x 7 grid of 1-pixel patches learns slowly
    from timm's small random start) and save its weights; returns its accuracy on the last 297
    digits, which it did not train on."""
    from timm.models.vision_transformer import VisionTransformer

    from models import get_2d_sincos_pos_embed

    torch.manual_seed(seed)
    pixels, labels = digits_in_unit_range()
    inputs = encoder_inputs(pixels, IMAGENET_MEAN, IMAGENET_STD, ENCODER_INPUT)  # (N, 3, 7, 7)
    targets = torch.tensor(labels)
    vit = VisionTransformer(img_size=ENCODER_INPUT, patch_size=1, embed_dim=64, depth=2, num_heads=1,
                            num_classes=NUM_CLASSES)
    with torch.no_grad():
        vit.pos_embed[0, 1:] = get_2d_sincos_pos_embed(64, ENCODER_INPUT)  # (49, 64) after the class token's
    optimizer = torch.optim.AdamW(vit.parameters(), lr=3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    train_count = 1500
    for _ in range(steps):
        batch = torch.randint(0, train_count, (128,))
        loss = torch.nn.functional.cross_entropy(vit(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    vit.eval()
    with torch.no_grad():
        accuracy = (vit(inputs[train_count:]).argmax(1) == targets[train_count:]).float().mean().item()
    atomic_torch_save(vit.state_dict(), path)
    return accuracy


def train_run(workdir: str, encoder: str, seed: int, aligned: bool, steps: list[int], repa_depth: int,
              repa_coeff: float) -> str:
    """One train.py run (a subprocess); returns its experiment folder."""
    name = f"{'repa' if aligned else 'plain'}-seed{seed}"
    results = os.path.join(workdir, "results", name)
    every = int(np.gcd.reduce(steps))
    command = [sys.executable, os.path.join(REPO, "train.py"), "--data-path", os.path.join(workdir, "digits"),
               "--results-dir", results, *TRAIN_FLAGS, "--global-seed", str(seed), "--max-steps", str(max(steps)),
               "--ckpt-every", str(every)]
    if aligned:
        command += ["--repa-encoder", encoder, "--repa-depth", str(repa_depth), "--repa-coeff", str(repa_coeff),
                    "--repa-projector-dim", "256"]
    return run_train(command, results, name)


def prepare_workdir(workdir: str) -> float:
    """One thread, the work folder with the digits exported into <workdir>/digits (once); returns the start time."""
    torch.set_num_threads(1)
    started = time.time()
    os.makedirs(workdir, exist_ok=True)
    if not os.path.isdir(os.path.join(workdir, "digits")):
        export_digits.main([os.path.join(workdir, "digits")])
    return started


def run_train(command: list[str], results: str, name: str) -> str:
    """Run one train.py command line in a subprocess (one thread, outside any torchrun); returns the
    experiment folder it made in `results`; RuntimeError with its stderr's end when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(command, env=env, text=True, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name}: train.py exit {result.returncode}\n{result.stderr[-3000:]}")
    (experiment,) = os.listdir(results)
    return os.path.join(results, experiment)


@torch.no_grad()
def sample_digits(checkpoint: str, num_samples: int) -> tuple[torch.Tensor, np.ndarray]:
    """EMA samples as grey uint8-rounded images in [-1, 1] (N, 3, 8, 8), and the labels they were asked for."""
    model, _ = load_model(checkpoint)
    z, y = noise_and_labels(range(num_samples), SAMPLE_SEED, (3, IMAGE_SIZE, IMAGE_SIZE), NUM_CLASSES)
    sample_fn = Sampler(create_transport()).sample_ode(sampling_method="euler", num_steps=SAMPLING_STEPS,
                                                       keep_trajectory=False)
    samples = guided_sample(sample_fn, model, z, y, GuidanceConfig(scale=CFG_SCALE))
    levels = ((samples.clamp(-1, 1) + 1) * 127.5).round().mean(dim=1, keepdim=True).round()  # (N, 1, 8, 8) grey
    return levels.repeat(1, 3, 1, 1) / 127.5 - 1, y.numpy()


def encoder_features(encoder, images: torch.Tensor) -> np.ndarray:
    """The encoder's mean patch token per image: (N, 64) float64."""
    return encoder.patch_tokens(images).mean(dim=1).double().numpy()


def fd_to(reference: np.ndarray, features: np.ndarray) -> float:
    return frechet_distance(reference.mean(0), np.cov(reference, rowvar=False),
                            features.mean(0), np.cov(features, rowvar=False))


def evaluate(checkpoint: str, num_samples: int, classifier, encoder, real_features: np.ndarray) -> dict:
    """Class accuracy (SVC) and FD-enc of one checkpoint's samples."""
    images, labels = sample_digits(checkpoint, num_samples)
    grey = ((images[:, 0] + 1) * 127.5).numpy().reshape(num_samples, 64)  # 0..255
    accuracy = float(np.mean(classifier.predict(grey / 255.0 * 16) == labels))
    return {"accuracy": accuracy, "fd_enc": fd_to(real_features, encoder_features(encoder, images))}


def summary(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsInHelp)
    parser.add_argument("--steps", type=str, default="100,200,400", help="step counts to evaluate (the last: run length)")
    parser.add_argument("--seeds", type=str, default="0,1,2", help="comma-separated seeds: one pair of runs each")
    parser.add_argument("--num-samples", type=int, default=500, help="EMA samples graded per checkpoint")
    parser.add_argument("--repa-depth", type=int, default=2, help="the block aligned (train.py --repa-depth)")
    parser.add_argument("--repa-coeff", type=float, default=0.5, help="the alignment loss weight (train.py --repa-coeff)")
    parser.add_argument("--jobs", type=int, default=1, help="train.py runs at a time")
    parser.add_argument("--workdir", type=str, default="results/repa_digits", help="folder of the runs and results")
    args = parser.parse_args()
    steps, seeds = sorted(int(s) for s in args.steps.split(",")), [int(s) for s in args.seeds.split(",")]
    started = prepare_workdir(args.workdir)
    encoder_path = os.path.join(args.workdir, "digit_encoder.pt")
    encoder_accuracy = train_encoder(encoder_path)
    spec = describe_encoder(encoder_path)
    print(f"encoder: ViT patch {spec.patch_size}, {spec.embed_dim} dims, {ENCODER_INPUT}x{ENCODER_INPUT} inputs; "
          f"held-out digit accuracy {encoder_accuracy:.3f} ({time.time() - started:.0f}s)", flush=True)

    runs = [(seed, aligned) for seed in seeds for aligned in (False, True)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        folders = list(pool.map(lambda run: train_run(args.workdir, encoder_path, run[0], run[1], steps,
                                                      args.repa_depth, args.repa_coeff), runs))
    print(f"trained {len(runs)} runs of {max(steps)} steps ({time.time() - started:.0f}s)", flush=True)

    classifier, svc_accuracy = digit_classifier()
    encoder = load_encoder(encoder_path, IMAGE_SIZE, torch.device("cpu"))
    real, _ = digits_in_unit_range()
    real_features = encoder_features(encoder, real)
    halves = fd_to(real_features[::2], real_features[1::2])  # the floor: real digits against real digits
    results = []
    for (seed, aligned), folder in zip(runs, folders):
        for step in steps:
            checkpoint = os.path.join(folder, "checkpoints", f"{step:07d}.pt")
            results.append(dict(seed=seed, repa=aligned, step=step,
                                **evaluate(checkpoint, args.num_samples, classifier, encoder, real_features)))
    lines = [f"| steps | accuracy plain | accuracy REPA | FD-enc plain | FD-enc REPA |", "|---|---|---|---|---|"]
    for step in steps:
        cell = {(aligned, key): [r[key] for r in results if r["step"] == step and r["repa"] == aligned]
                for aligned in (False, True) for key in ("accuracy", "fd_enc")}
        lines.append(f"| {step} | {summary(cell[False, 'accuracy'])} | {summary(cell[True, 'accuracy'])} | "
                     f"{summary(cell[False, 'fd_enc'])} | {summary(cell[True, 'fd_enc'])} |")
    table = "\n".join(lines)
    print(f"\n{len(seeds)} seeds, {args.num_samples} samples each (Euler {SAMPLING_STEPS}, cfg {CFG_SCALE}); "
          f"SVC held-out accuracy on real digits {svc_accuracy:.3f}; FD-enc of real digits (half vs half) "
          f"{halves:.3f}; REPA block {args.repa_depth} of 4, coeff {args.repa_coeff}\n{table}\n"
          f"total {time.time() - started:.0f}s", flush=True)
    atomic_json(os.path.join(args.workdir, "repa_digits.json"),
                dict(table=table, runs=results, encoder_accuracy=encoder_accuracy, svc_accuracy=svc_accuracy,
                     fd_enc_real_halves=halves, args=vars(args)))


if __name__ == "__main__":
    main()
