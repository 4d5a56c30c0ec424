"""Kill train.py, sample_ddp.py and extract_features.py at random moments (SIGKILL), run them again, and
count the runs that end bit-identical to an uninterrupted one with nothing left behind.

    python benchmarks/kill_resume.py --kills 5 --seed 0

Each script runs a tiny job on the CPU (a pixel-space SiT, a tiny random VAE, a few random images).
A reference run goes uninterrupted; then, --kills times, the same job is started, killed after a
random time within the reference's wall time, and run again to the end: train.py with --resume when
the killed run left a checkpoint (else afresh), the others with the same command. A run counts as
bit-identical when its final files equal the reference's (train.py: every tensor of the last
checkpoint and its counters; sample_ddp.py: the .npz bytes; extract_features.py: the arrays' bytes),
and as clean when no temporary file (.tmp-*) and no lock (owner.lock) is left. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import download  # noqa: E402
import models  # noqa: E402
from sit.cli import DefaultsInHelp, positive_int  # noqa: E402
from sit.latents import random_sd_vae  # noqa: E402

TINY_SIT = {"depth": 1, "hidden_size": 32, "num_heads": 2}


@dataclass
class Job:
    """One script's job: how to run it into an output folder, run it again after a kill, and read its result."""
    name: str
    command: Callable[[str], list[str]]
    rerun: Callable[[str], list[str]]
    result: Callable[[str], object]


def make_workspace(root: str) -> dict[str, str]:
    """Random 12x12 PNGs (2 classes x 4), a tiny random VAE folder and a tiny pixel-space checkpoint."""
    rng = np.random.default_rng(0)
    for label in range(2):
        os.makedirs(os.path.join(root, "data", f"class{label}"))
        for index in range(4):
            pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, "data", f"class{label}", f"{index}.png"))
    torch.manual_seed(0)
    random_sd_vae(widths=(8, 8, 8, 8), layers_per_block=1, norm_groups=4).save_pretrained(os.path.join(root, "vae"))
    model = models.SiT(input_size=8, patch_size=2, in_channels=3, num_classes=2, **TINY_SIT)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    state = model.state_dict()
    checkpoint = os.path.join(root, "model.pt")
    torch.save({"model": state, "ema": state, "model_config": model.config,
                "args": {"vae": "none", "path_type": "Linear", "prediction": "velocity"}}, checkpoint)
    return {"data": os.path.join(root, "data"), "vae": os.path.join(root, "vae"), "ckpt": checkpoint}


def script(name: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, name), *args]


def newest_checkpoint(results: str) -> Optional[str]:
    """The highest-step checkpoint of the newest experiment in results (None: no checkpoint yet)."""
    experiments = sorted(name for name in os.listdir(results) if os.path.isdir(os.path.join(results, name))) \
        if os.path.isdir(results) else []
    for experiment in reversed(experiments):
        folder = os.path.join(results, experiment, "checkpoints")
        steps = sorted(name for name in os.listdir(folder) if name.endswith(".pt") and not name.startswith(".")) \
            if os.path.isdir(folder) else []
        if steps:
            return os.path.join(folder, steps[-1])
    return None


def train_result(results: str) -> object:
    checkpoint = download.load_checkpoint(newest_checkpoint(results))
    tensors = {f"{part}.{name}": tensor for part in ("model", "ema") for name, tensor in checkpoint[part].items()}
    moments = [(index, key, value) for index, state in sorted(checkpoint["opt"]["state"].items())
               for key, value in sorted(state.items())]
    return (checkpoint["train_steps"], checkpoint["epoch"], checkpoint["epoch_step"], tensors, moments)


def same(first: object, second: object) -> bool:
    """Equality that compares tensors bit for bit, inside tuples, lists and dicts."""
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and first.dtype == second.dtype and torch.equal(first, second)
    if isinstance(first, (tuple, list)):
        return type(first) is type(second) and len(first) == len(second) and all(map(same, first, second))
    if isinstance(first, dict):
        return isinstance(second, dict) and first.keys() == second.keys() and all(same(first[k], second[k]) for k in first)
    return first == second


def file_bytes(*names: str) -> Callable[[str], object]:
    def read(folder: str) -> object:
        found = []
        for name in names:
            paths = [os.path.join(folder, entry) for entry in sorted(os.listdir(folder)) if entry.endswith(name)]
            found += [open(path, "rb").read() for path in paths]
        return found
    return read


def jobs(workspace: dict[str, str]) -> list[Job]:
    train = ["--data-path", workspace["data"], "--vae", "none", "--image-size", "8", "--model", "SiT-S/2",
             "--model-config", json.dumps(TINY_SIT), "--num-classes", "2", "--global-batch-size", "2", "--num-workers",
             "0", "--ckpt-every", "2", "--sample-every", "100000", "--log-every", "1", "--max-steps", "8"]
    sample = ["ODE", "--ckpt", workspace["ckpt"], "--sampling-method", "euler", "--num-sampling-steps", "4",
              "--num-fid-samples", "16", "--per-proc-batch-size", "2"]
    extract = ["--data-path", workspace["data"], "--image-size", "16", "--vae", workspace["vae"], "--block-size", "2",
               "--batch-size", "2", "--num-workers", "0"]

    def train_again(out: str) -> list[str]:
        if newest_checkpoint(out) is None:  # killed before its first checkpoint: start again, as a user would
            return script("train.py", *train, "--results-dir", out)
        return script("train.py", "--data-path", workspace["data"], "--num-workers", "0", "--max-steps", "8",
                      "--resume", os.path.dirname(os.path.dirname(newest_checkpoint(out))))

    return [
        Job("train.py", lambda out: script("train.py", *train, "--results-dir", out), train_again, train_result),
        Job("sample_ddp.py", lambda out: script("sample_ddp.py", *sample, "--sample-dir", out),
            lambda out: script("sample_ddp.py", *sample, "--sample-dir", out), file_bytes(".npz")),
        Job("extract_features.py", lambda out: script("extract_features.py", *extract, "--features-path", out),
            lambda out: script("extract_features.py", *extract, "--features-path", out),
            file_bytes("mean.npy", "std.npy", "labels.npy")),
    ]


def environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_to_end(command: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=600)


def leftovers(folder: str) -> list[str]:
    """Temporary files and locks left under folder (and, for sample folders, beside it: the .npz's)."""
    return [name for _, _, names in os.walk(folder) for name in names if name.startswith(".tmp-") or name == "owner.lock"]


def trial(job: Job, reference: object, wall: float, cwd: str, out: str, rng: random.Random) -> dict[str, object]:
    """Start the job, SIGKILL it after a random time, run it again to the end; what came of it."""
    process = subprocess.Popen(job.command(out), cwd=cwd, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    delay = rng.uniform(0.0, wall)
    time.sleep(delay)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait()
    rerun = run_to_end(job.rerun(out), cwd)
    identical = rerun.returncode == 0 and same(job.result(out), reference)
    return {"killed": killed, "delay": delay, "ok": rerun.returncode == 0, "identical": identical,
            "clean": not leftovers(out), "error": rerun.stderr.strip().splitlines()[-1:] if rerun.returncode else []}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsInHelp)
    parser.add_argument("--kills", type=positive_int, default=5, help="killed runs per script")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--scripts", nargs="+", default=["train.py", "sample_ddp.py", "extract_features.py"],
                        help="the scripts to kill and rerun")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kill-resume-") as root:
        workspace = make_workspace(root)
        for job in [job for job in jobs(workspace) if job.name in args.scripts]:
            started = time.time()
            straight = run_to_end(job.command(os.path.join(root, f"{job.name}-reference")), root)
            wall = time.time() - started
            if straight.returncode != 0:
                raise SystemExit(f"{job.name}: the reference run failed: {straight.stderr[-2000:]}")
            reference = job.result(os.path.join(root, f"{job.name}-reference"))
            results = [trial(job, reference, wall, root, os.path.join(root, f"{job.name}-{index}"), rng)
                       for index in range(args.kills)]
            rows.append((job.name, wall, results))
            for result in results:
                if result["error"]:
                    print(f"{job.name}: rerun failed after a kill at {result['delay']:.1f} s: {result['error'][0]}",
                          file=sys.stderr)
    print("| script | runs | killed mid-run | reruns exit 0 | bit-identical | no leftovers | reference run |")
    print("|---|---|---|---|---|---|---|")
    for name, wall, results in rows:
        count = lambda key: sum(bool(result[key]) for result in results)  # noqa: E731
        print(f"| {name} | {len(results)} | {count('killed')} | {count('ok')} | {count('identical')} | "
              f"{count('clean')} | {wall:.1f} s |")


if __name__ == "__main__":
    main()
