"""Learning evidence for LightningDiT's block options on the CPU, offline: the README's digits pixel model
(configs/digits.yaml: 8x8 digits, patch 2, a 4x4 grid of tokens, width 64, 4 blocks of 4 heads) trained
with the original SiT block and with LightningDiT's options (RoPE, SwiGLU, RMSNorm, QK-norm), the same
steps, data order and seeds, graded by the SVC of tests/test_digits.py (benchmarks/repa_digits.py's).

1. export scikit-learn's 1,797 8x8 digits as an ImageFolder (export_digits.py);
2. for each seed, train the digits SiT (train.py --vae none --image-size 8) twice: the SiT block, and
   --model-config with rope, swiglu, rms_norm and qk_norm on;
3. at each step count, sample --num-samples images from the EMA weights (Euler, 50 steps, cfg 1.5,
   per-index noise and labels as sample_ddp.py) and measure the share the SVC reads as the asked class.

    python benchmarks/lightningdit_digits.py --steps 1000 --seeds 0,1,2

Prints one table (mean and spread over the seeds) and writes it, with every run's numbers, to
<workdir>/lightningdit_digits.json and <workdir>/lightningdit_digits.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from repa_digits import (CFG_SCALE, MODEL_CONFIG, SAMPLING_STEPS, TRAIN_FLAGS, digit_classifier,  # noqa: E402
                         prepare_workdir, run_train, sample_digits, summary)
from sit.cli import DefaultsInHelp  # noqa: E402
from sit.files import atomic_json, atomic_text  # noqa: E402

LIGHTNINGDIT_OPTIONS = {"rope": True, "swiglu": True, "rms_norm": True, "qk_norm": True}
ARMS = {"SiT block": MODEL_CONFIG, "LightningDiT block": {**MODEL_CONFIG, **LIGHTNINGDIT_OPTIONS}}


def train_flags(model_config: dict) -> list[str]:
    """repa_digits.py's train.py flags (configs/digits.yaml's model and optimiser) with this --model-config."""
    flags = list(TRAIN_FLAGS)
    flags[flags.index("--model-config") + 1] = json.dumps(model_config)
    return flags


def train_run(workdir: str, arm: str, seed: int, steps: list[int]) -> str:
    """One train.py run of an arm (a subprocess, one thread); returns its experiment folder."""
    name = f"{arm.split()[0].lower()}-seed{seed}"
    results = os.path.join(workdir, "results", name)
    command = [sys.executable, os.path.join(REPO, "train.py"), "--data-path", os.path.join(workdir, "digits"),
               "--results-dir", results, *train_flags(ARMS[arm]), "--global-seed", str(seed),
               "--max-steps", str(max(steps)), "--ckpt-every", str(int(np.gcd.reduce(steps)))]
    return run_train(command, results, name)


def accuracy(checkpoint: str, num_samples: int, classifier) -> float:
    """The share of one checkpoint's samples that the SVC reads as the class they were asked for."""
    images, labels = sample_digits(checkpoint, num_samples)
    grey = ((images[:, 0] + 1) * 127.5).numpy().reshape(num_samples, 64)  # 0..255
    return float(np.mean(classifier.predict(grey / 255.0 * 16) == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsInHelp)
    parser.add_argument("--steps", type=str, default="1000", help="step counts to evaluate (the last: run length)")
    parser.add_argument("--seeds", type=str, default="0,1,2", help="comma-separated seeds: one run per block each")
    parser.add_argument("--num-samples", type=int, default=500, help="EMA samples graded per checkpoint")
    parser.add_argument("--workdir", type=str, default="results/lightningdit_digits", help="folder of the runs and results")
    args = parser.parse_args()
    steps, seeds = sorted(int(s) for s in args.steps.split(",")), [int(s) for s in args.seeds.split(",")]
    started = prepare_workdir(args.workdir)
    classifier, svc_accuracy = digit_classifier()
    results, seconds = [], {}
    for seed in seeds:
        for arm in ARMS:
            began = time.time()
            folder = train_run(args.workdir, arm, seed, steps)
            seconds[f"{arm}, seed {seed}"] = round(time.time() - began, 1)
            for step in steps:
                checkpoint = os.path.join(folder, "checkpoints", f"{step:07d}.pt")
                results.append(dict(seed=seed, arm=arm, step=step,
                                    accuracy=accuracy(checkpoint, args.num_samples, classifier)))
            print(f"{arm}, seed {seed}: {[r['accuracy'] for r in results[-len(steps):]]} "
                  f"({seconds[f'{arm}, seed {seed}']:.0f}s training; {time.time() - started:.0f}s in all)", flush=True)
    lines = ["| steps | " + " | ".join(f"accuracy, {arm}" for arm in ARMS) + " |", "|---" * (len(ARMS) + 1) + "|"]
    for step in steps:
        cells = [summary([r["accuracy"] for r in results if r["step"] == step and r["arm"] == arm]) for arm in ARMS]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    caption = (f"{len(seeds)} seeds ({args.seeds}), {args.num_samples} samples each (Euler {SAMPLING_STEPS}, "
               f"cfg {CFG_SCALE}), mean ± std over the seeds; SVC held-out accuracy on real digits "
               f"{svc_accuracy:.3f}; LightningDiT block: {', '.join(LIGHTNINGDIT_OPTIONS)}")
    print(f"\n{caption}\n{table}\ntotal {time.time() - started:.0f}s", flush=True)
    atomic_json(os.path.join(args.workdir, "lightningdit_digits.json"),
                dict(table=table, caption=caption, runs=results, train_seconds=seconds, svc_accuracy=svc_accuracy,
                     arms=ARMS, total_seconds=round(time.time() - started), args=vars(args)))
    atomic_text(os.path.join(args.workdir, "lightningdit_digits.md"), f"{caption}\n\n{table}\n", suffix=".md")


if __name__ == "__main__":
    main()
