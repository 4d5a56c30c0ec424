"""Learning evidence for MeanFlow on the CPU, offline: the digits pixel model (configs/digits.yaml's,
benchmarks/repa_digits.py's flags) trained by train.py with --objective meanflow and with the flow
objective, the same steps, data order and seeds; then the class accuracy (the SVC of tests/test_digits.py)
of 1- and 2-step MeanFlow samples against 1-, 2- and 50-step Euler samples of the flow model, and their
Fréchet distance to the real digits in pixel space (FD-pixels: accuracy alone rewards blurred class means).

All samples unguided (cfg 1: the flow model's guidance would need a MeanFlow counterpart, --meanflow-omega,
which this comparison leaves at the paper's default, off), EMA weights, per-index noise and labels as
sample_ddp.py. Settings fixed before looking: seeds 0,1,2, the paper's MeanFlow defaults.

    python benchmarks/meanflow_digits.py --steps 1000 --seeds 0,1,2 --num-samples 500

Writes <workdir>/meanflow_digits.json and .md (the table) and meanflow_digits.png (seed 0: one row per
class, columns of 8 samples per sampler: MeanFlow 1, 2 steps | flow Euler 1, 2, 50 steps).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import export_digits  # noqa: E402
from repa_digits import (IMAGE_SIZE, NUM_CLASSES, TRAIN_FLAGS, digit_classifier, fd_to,  # noqa: E402
                         prepare_workdir, run_train, summary)
from sit.checkpoint import load_model  # noqa: E402
from sit.config import GuidanceConfig  # noqa: E402
from sit.cli import DefaultsInHelp  # noqa: E402
from sit.files import atomic_json, atomic_text, atomic_write  # noqa: E402
from sit.generation import guided_sample, noise_and_labels  # noqa: E402
from sit.sampling.meanflow import MeanFlowConfig  # noqa: E402
from transport import Sampler, create_transport  # noqa: E402

SAMPLE_SEED = 0
SAMPLERS = [("meanflow", 1), ("meanflow", 2), ("flow", 1), ("flow", 2), ("flow", 50)]  # (objective, model evaluations)


def train_run(workdir: str, objective: str, seed: int, steps: int) -> str:
    """One train.py run (a subprocess); returns its final checkpoint (a finished run's is reused)."""
    results = os.path.join(workdir, "results", f"{objective}-seed{seed}")
    if os.path.isdir(results) and len(os.listdir(results)) == 1:
        finished = os.path.join(results, os.listdir(results)[0], "checkpoints", f"{steps:07d}.pt")
        if os.path.isfile(finished):
            return finished
    command = [sys.executable, os.path.join(REPO, "train.py"), "--data-path", os.path.join(workdir, "digits"),
               "--results-dir", results, *TRAIN_FLAGS, "--global-seed", str(seed), "--max-steps", str(steps),
               "--ckpt-every", str(steps), "--objective", objective]
    experiment = run_train(command, results, f"{objective} seed {seed}")
    return os.path.join(experiment, "checkpoints", f"{steps:07d}.pt")


@torch.no_grad()
def sample_digits(checkpoint: str, objective: str, evaluations: int, num_samples: int) -> tuple[torch.Tensor, np.ndarray, int]:
    """Unguided EMA samples as grey levels 0..255 (N, 8, 8), the labels asked for and the model evaluations made."""
    model, _ = load_model(checkpoint)
    z, y = noise_and_labels(range(num_samples), SAMPLE_SEED, (3, IMAGE_SIZE, IMAGE_SIZE), NUM_CLASSES)
    if objective == "meanflow":
        sample_fn = MeanFlowConfig(num_steps=evaluations).sample_fn(None)
    else:  # Euler on a grid of evaluations + 1 times: `evaluations` steps
        sample_fn = Sampler(create_transport()).sample_ode(sampling_method="euler", num_steps=evaluations + 1)
    samples = guided_sample(sample_fn, model, z, y, GuidanceConfig(scale=1.0))
    grey = ((samples.clamp(-1, 1) + 1) * 127.5).round().mean(dim=1).round()  # (N, 8, 8)
    return grey, y.numpy(), sample_fn.nfe


def figure(path: str, grids: list[torch.Tensor], labels: np.ndarray, per_class: int = 8, zoom: int = 4) -> None:
    """One row per class, for each sampler a block of per_class samples of that class (white gaps between)."""
    from PIL import Image

    side, gap = IMAGE_SIZE * zoom, 2 * zoom
    width = len(grids) * (per_class * side + gap) - gap
    canvas = np.full((NUM_CLASSES * side, width), 255, dtype=np.uint8)
    for block, grey in enumerate(grids):
        for digit in range(NUM_CLASSES):
            chosen = np.flatnonzero(labels == digit)[:per_class]
            for column, index in enumerate(chosen):
                tile = np.kron(grey[index].numpy().astype(np.uint8), np.ones((zoom, zoom), dtype=np.uint8))
                left = block * (per_class * side + gap) + column * side
                canvas[digit * side:(digit + 1) * side, left:left + side] = tile
    atomic_write(path, lambda temporary: Image.fromarray(canvas).save(temporary, format="PNG"), suffix=".png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsInHelp)
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every run (the quick start's)")
    parser.add_argument("--seeds", type=str, default="0,1,2", help="comma-separated seeds: one run per objective each")
    parser.add_argument("--num-samples", type=int, default=500, help="unguided EMA samples graded per sampler")
    parser.add_argument("--workdir", type=str, default="results/meanflow_digits", help="folder of the runs and results")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    started = prepare_workdir(args.workdir)
    checkpoints, seconds = {}, {}
    for seed in seeds:
        for objective in ("meanflow", "flow"):
            begun = time.time()
            checkpoints[objective, seed] = train_run(args.workdir, objective, seed, args.steps)
            seconds[f"{objective}-seed{seed}"] = round(time.time() - begun, 1)
            print(f"trained {objective} seed {seed}: {seconds[f'{objective}-seed{seed}']}s", flush=True)
    classifier, svc_accuracy = digit_classifier()
    real = export_digits.digits_uint8()[0].reshape(-1, 64) / 255.0 * 16  # (1797, 64) grey levels 0..16
    runs, grids = [], []
    for seed in seeds:
        for objective, evaluations in SAMPLERS:
            grey, labels, nfe = sample_digits(checkpoints[objective, seed], objective, evaluations, args.num_samples)
            features = grey.reshape(len(grey), 64).numpy() / 255.0 * 16
            accuracy = float(np.mean(classifier.predict(features) == labels))
            # Fréchet distance of the 64 grey levels to all real digits: blurred class means, which the SVC
            # still reads as their digit, lack the real digits' spread and score badly here
            runs.append(dict(seed=seed, objective=objective, evaluations=nfe, accuracy=accuracy,
                             fd_pixels=fd_to(real, features.astype(np.float64))))
            if seed == seeds[0]:
                grids.append(grey)
                figure_labels = labels
    lines = ["| model (objective) | sampler | model evaluations | accuracy (mean ± std over seeds) | per seed | "
             "FD-pixels (lower is better) | per seed |", "|---|---|---|---|---|---|---|"]
    for objective, evaluations in SAMPLERS:
        chosen = [run for run in runs if (run["objective"], run["evaluations"]) == (objective, evaluations)]
        sampler = "MeanFlow jumps" if objective == "meanflow" else "Euler"
        cells = [f"{summary([run[key] for run in chosen])} | {', '.join(f'{run[key]:.3f}' for run in chosen)}"
                 for key in ("accuracy", "fd_pixels")]
        lines.append(f"| {objective} | {sampler} | {evaluations} | {' | '.join(cells)} |")
    table = "\n".join(lines)
    header = (f"{len(seeds)} seeds ({args.seeds}), {args.steps} training steps each (batch 128), {args.num_samples} "
              f"unguided EMA samples per sampler; SVC held-out accuracy on real digits {svc_accuracy:.3f}")
    print(f"\n{header}\n{table}\ntotal {time.time() - started:.0f}s", flush=True)
    figure(os.path.join(args.workdir, "meanflow_digits.png"), grids, figure_labels)
    atomic_json(os.path.join(args.workdir, "meanflow_digits.json"),
                dict(table=table, header=header, runs=runs, svc_accuracy=svc_accuracy, train_seconds=seconds,
                     total_seconds=round(time.time() - started), args=vars(args)))
    atomic_text(os.path.join(args.workdir, "meanflow_digits.md"), f"{header}\n\n{table}\n", suffix=".md")


if __name__ == "__main__":
    main()
