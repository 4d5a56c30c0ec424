"""Prove that a restructuring of the library changed no behaviour: same command lines, same output files.

`capture` runs the real scripts (train.py, extract_features.py, export_digits.py, sample.py,
sample_ddp.py) as subprocesses of one source tree, at tiny size, on CPU, with fixed seeds, and writes
everything they produce under one folder. `compare` walks two such folders and compares every file
by what it holds, not by its bytes: checkpoints tensor by tensor, PNGs by their decoded pixels, .npz
and .npy arrays exactly, .json and .csv parsed, text files line by line. Two captures of one tree give
0 differences (the runs are deterministic), so any difference between captures of two trees is a
change of behaviour.

Before/after a change:

    git worktree add /tmp/before <base commit>
    python benchmarks/equivalence.py capture /tmp/eq_before --repo /tmp/before
    python benchmarks/equivalence.py capture /tmp/eq_after            # this tree
    python benchmarks/equivalence.py compare /tmp/eq_before /tmp/eq_after

Run both captures with this same file (the newer copy), so that both trees are driven by the same
command lines and get the same inputs. The inputs (a tiny image folder, a tiny random diffusers
AutoencoderKL in the SD-VAE layout with tiny widths, scikit-learn's digits through export_digits.py)
are built by the capture itself under <OUT_DIR>/inputs. Each command's console output goes to
<OUT_DIR>/console/, which compare skips (it holds timings and progress bars). A command that exits
non-zero stops the capture, printing its command line and the end of its output.

What two captures legitimately disagree on, and how compare treats it:
- absolute paths: every string (in checkpoints, .json, .csv, text) has its capture folder's path
  replaced by <OUT> before comparing, so paths inside the capture compare equal and nothing else;
- folder and file names holding an 8-hex-digit hash of an absolute path (sample_ddp.py's folders
  name the checkpoint and VAE as <stem>-<sha1 of the real path>[:8]): the hash reads as <hash>;
- the SHA-256 of a checkpoint file in sample_ddp.py's .json record (the keys checkpoint_sha256 and
  guide_checkpoint_sha256): a train.py checkpoint stores absolute paths, so its bytes (and hash)
  differ between capture folders; its contents are compared in the .pt itself;
- wall-clock: the "[YYYY-MM-DD HH:MM:SS]" prefix of log lines and the speeds of train.py's loss
  lines (Train Steps/Sec, Images/Sec) read as <time> and <rate>, and metrics.jsonl's wall-clock fields
  (time, steps_per_sec, images_per_sec) are left out (no .json or .csv holds a time).
Nothing else is ignored: checkpoint counters, RNG states, optimizer state, args and model_config
must be equal. So compare captures where they were made: a copied or moved capture still holds the
old folder's paths, and those read as differences.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

THIS_REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = ["--model", "SiT-S/2", "--model-config", json.dumps({"depth": 1, "hidden_size": 32, "num_heads": 2})]
EULER = ["--sampling-method", "euler", "--num-sampling-steps", "4"]
QUIET_TRAIN = ["--log-every", "1", "--num-workers", "0", "--global-seed", "0"]
COMMAND_TIMEOUT_S = 600

CONSOLE_DIR = "console"
IGNORED_JSON_KEYS = frozenset({"checkpoint_sha256", "guide_checkpoint_sha256"})
PATH_HASH = re.compile(r"(?<=-)[0-9a-f]{8}(?=-|\.|$)")
LOG_TIME = re.compile(r"\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\]")
RATE = re.compile(r"((?:Steps|Images)/Sec: )[0-9.eE+-]+")
MATMUL_RATIO = re.compile(r"(a bf16 matmul runs )[0-9.]+x")  # measured at start-up: varies with the load


#################################################################################
#                                    Inputs                                     #
#################################################################################

def make_image_folder(path: Path, num_classes: int = 2, per_class: int = 4, size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder of random RGB PNGs, every second one 8 px wider than tall (tests/conftest.py's)."""
    rng = np.random.default_rng(seed)
    from PIL import Image

    for label in range(num_classes):
        folder = path / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            height, width = size, size + 8 * (index % 2)
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return path


def make_tiny_vae(path: Path) -> Path:
    """A random diffusers AutoencoderKL in SD-VAE's layout (4 blocks, downsampling 8, 4 latent channels), width 8."""
    import torch
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(str(path))
    return path


#################################################################################
#                                    Capture                                    #
#################################################################################

@dataclass
class Step:
    """One command line: a script of the repository and its arguments (strings; Paths are made absolute)."""

    name: str
    script: str
    args: list[Any]

    def argv(self) -> list[str]:
        return [sys.executable, self.script, *(str(arg) for arg in self.args)]


def only_child(folder: Path) -> Path:
    """The one entry of a folder (train.py's experiment folder in its --results-dir)."""
    (child,) = sorted(folder.iterdir())
    return child


def newest_checkpoint(results_dir: Path) -> Path:
    """The newest checkpoint of the one experiment in results_dir."""
    return sorted((only_child(results_dir) / "checkpoints").glob("*.pt"))[-1]


def script_env() -> dict[str, str]:
    """The environment of every command: CPU only, one thread, offline, no distributed leftovers."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TQDM_DISABLE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH"):
        env.pop(key, None)
    return env


def run_step(index: int, step: Step, repo: Path, out: Path) -> float:
    """Run one command in repo, its console output to <out>/console/; exit on failure. Returns its seconds."""
    console = out / CONSOLE_DIR / f"{index:02d}-{step.name}.log"
    argv = step.argv()
    shown = " ".join(argv[1:])
    print(f"[{index:02d}] {shown}", flush=True)
    start = time.perf_counter()
    with open(console, "w") as handle:
        result = subprocess.run(argv, cwd=repo, env=script_env(), stdout=handle, stderr=subprocess.STDOUT,
                                timeout=COMMAND_TIMEOUT_S)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = console.read_text(errors="replace")[-3000:]
        sys.exit(f"equivalence.py: command {index} failed (exit {result.returncode}), cwd {repo}:\n"
                 f"  {' '.join(argv)}\n--- end of its output ({console}) ---\n{tail}")
    return seconds


class LazyPath:
    """A path found only when its command runs (the newest checkpoint of an earlier command's experiment)."""

    def __init__(self, find: Callable[[], Path]):
        self.find = find

    def __str__(self) -> str:
        return str(self.find())


def training_steps(inputs: Path, out: Path) -> list[Step]:
    """export_digits.py, then train.py: fresh, resumed, bf16 with clipping, from cached features, on pixels."""
    images, vae, digits, results = inputs / "images", inputs / "vae", inputs / "digits", out / "train"
    latent = ["--vae", vae, *TINY_MODEL, "--image-size", "32", "--num-classes", "2", *QUIET_TRAIN]
    three_steps = ["--max-steps", "3", "--ckpt-every", "3", "--sample-every", "3"]
    return [
        Step("export-digits", "export_digits.py", [digits]),
        # 8 images in batches of 3 (2 an epoch): the fresh run stops, and the resumed one starts, mid-epoch 1
        Step("train-fresh", "train.py", ["--data-path", images, "--results-dir", results / "latent", *latent,
                                         "--global-batch-size", "3", "--max-steps", "3", "--ckpt-every", "2",
                                         "--sample-every", "2"]),
        Step("train-resume", "train.py", ["--data-path", images, "--results-dir", results / "latent", "--resume",
                                          *QUIET_TRAIN, "--max-steps", "6", "--ckpt-every", "2",
                                          "--sample-every", "3"]),
        Step("train-bf16-clip", "train.py", ["--data-path", images, "--results-dir", results / "bf16", *latent,
                                             "--global-batch-size", "4", "--precision", "bf16", "--max-grad-norm",
                                             "0.05", "--lr", "1e-3", *three_steps]),
        Step("extract-features", "extract_features.py", ["--data-path", images, "--features-path", out / "features",
                                                         "--image-size", "32", "--vae", vae, "--batch-size", "3",
                                                         "--block-size", "3", "--num-workers", "0"]),
        Step("train-features", "train.py", ["--feature-path", out / "features", "--results-dir", results / "features",
                                            *latent, "--global-batch-size", "4", *three_steps]),
        Step("train-pixel", "train.py", ["--data-path", digits, "--results-dir", results / "pixel", "--vae", "none",
                                         *TINY_MODEL, "--image-size", "8", "--num-classes", "10", "--no-random-flip",
                                         "--global-batch-size", "8", *QUIET_TRAIN, "--lr", "2e-3", *three_steps]),
    ]


def sampling_steps(inputs: Path, out: Path) -> list[Step]:
    """sample.py and sample_ddp.py (images, then likelihoods) from the latent and the pixel model trained before."""
    latent = LazyPath(lambda: newest_checkpoint(out / "train" / "latent"))
    pixel = LazyPath(lambda: newest_checkpoint(out / "train" / "pixel"))
    grids = out / "sample"
    labels = ["--class-labels", "0,1", "--num-images", "4", "--seed", "3"]
    ddp = ["--sample-dir", out / "sample_ddp", "--per-proc-batch-size", "2", "--global-seed", "1"]
    return [
        Step("sample-latent-ode", "sample.py", ["ODE", "--ckpt", latent, *labels, *EULER, "--cfg-scale", "2",
                                                "--output", grids / "latent-ode.png"]),
        Step("sample-latent-sde", "sample.py", ["SDE", "--ckpt", latent, *labels, "--sampling-method", "Heun",
                                                "--num-sampling-steps", "4", "--output", grids / "latent-sde.png"]),
        Step("sample-pixel-ode", "sample.py", ["ODE", "--ckpt", pixel, "--class-labels", "0,1,2,3", *EULER,
                                               "--cfg-scale", "1.5", "--output", grids / "pixel-ode.png"]),
        Step("sample-pixel-sde", "sample.py", ["SDE", "--ckpt", pixel, "--class-labels", "4,5,6,7",
                                               "--num-sampling-steps", "4", "--output", grids / "pixel-sde.png"]),
        Step("sample-ddp-latent-ode", "sample_ddp.py", ["ODE", "--ckpt", latent, *ddp, *EULER, "--cfg-scale", "1.5",
                                                        "--num-fid-samples", "4"]),
        Step("sample-ddp-latent-sde", "sample_ddp.py", ["SDE", "--ckpt", latent, *ddp, "--num-sampling-steps", "4",
                                                        "--num-fid-samples", "3"]),
        Step("likelihood-latent-generated", "sample_ddp.py", ["ODE", "--likelihood", "--ckpt", latent, *ddp, *EULER,
                                                              "--num-fid-samples", "3"]),
        Step("likelihood-latent-real", "sample_ddp.py", ["ODE", "--likelihood", "--ckpt", latent, *ddp, *EULER,
                                                         "--data-path", inputs / "images", "--num-fid-samples", "4"]),
        Step("sample-ddp-pixel-ode", "sample_ddp.py", ["ODE", "--ckpt", pixel, *ddp, *EULER, "--num-fid-samples", "4"]),
        Step("likelihood-pixel-real", "sample_ddp.py", ["ODE", "--likelihood", "--ckpt", pixel, *ddp, *EULER,
                                                        "--data-path", inputs / "digits", "--num-fid-samples", "6",
                                                        "--dequantize", "gaussian", "--num-probes", "2"]),
        Step("likelihood-pixel-generated", "sample_ddp.py", ["ODE", "--likelihood", "--ckpt", pixel, *ddp, *EULER,
                                                             "--num-fid-samples", "2", "--exact-trace"]),
    ]


def build_steps(inputs: Path, out: Path) -> list[Step]:
    """The capture's command lines, in order (later ones read earlier ones' outputs)."""
    return training_steps(inputs, out) + sampling_steps(inputs, out)


def capture(out: Path, repo: Path) -> int:
    """Build the inputs under <out>/inputs and run every command line of build_steps in repo; returns 0."""
    out, repo = out.resolve(), repo.resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"equivalence.py: {out} is not empty; capture into a new folder")
    for script in ("train.py", "sample.py", "sample_ddp.py", "extract_features.py", "export_digits.py"):
        if not (repo / script).is_file():
            sys.exit(f"equivalence.py: {repo} has no {script}; --repo must name the repository's root")
    started = time.perf_counter()
    inputs = out / "inputs"
    (out / CONSOLE_DIR).mkdir(parents=True)
    make_image_folder(inputs / "images")
    make_tiny_vae(inputs / "vae")
    steps = build_steps(inputs, out)
    for index, step in enumerate(steps, start=1):
        seconds = run_step(index, step, repo, out)
        print(f"     done in {seconds:.1f} s", flush=True)
    print(f"{len(steps)} command lines captured in {out} in {time.perf_counter() - started:.0f} s (repo {repo})")
    return 0


#################################################################################
#                                    Compare                                    #
#################################################################################

@dataclass
class Side:
    """One capture folder, and the spellings of its absolute path that strings may hold."""

    root: Path
    prefixes: list[re.Pattern[str]] = field(default_factory=list)

    @classmethod
    def of(cls, root: Path) -> "Side":
        spellings = {str(root).rstrip("/"), str(root.absolute()).rstrip("/"), os.path.realpath(root)}
        return cls(root, [re.compile(re.escape(spelling) + r"(?![\w.-])")
                          for spelling in sorted(spellings, key=len, reverse=True)])

    def normalise(self, text: str) -> str:
        """text with this capture's folder (not a longer name that starts alike) as <OUT>."""
        for prefix in self.prefixes:
            text = prefix.sub("<OUT>", text)
        return text


def normalised_relpath(relpath: str) -> str:
    """A file's path in its capture with path hashes (<stem>-<8 hex digits>) as <hash>."""
    return "/".join(PATH_HASH.sub("<hash>", part) for part in relpath.split("/"))


def list_files(side: Side) -> tuple[dict[str, str], list[str]]:
    """{normalised relative path: relative path} of every file outside console/, and the name clashes."""
    files: dict[str, str] = {}
    clashes = []
    for directory, folders, names in os.walk(side.root):
        folders.sort()
        for name in sorted(names):
            relpath = os.path.relpath(os.path.join(directory, name), side.root).replace(os.sep, "/")
            if relpath.split("/")[0] == CONSOLE_DIR:
                continue
            key = normalised_relpath(relpath)
            if key in files:
                clashes.append(f"{relpath} and {files[key]} both read as {key} in {side.root}")
            files[key] = relpath
    return files, clashes


def load_checkpoint(path: Path) -> Any:
    """A .pt file, loaded with weights_only=True (argparse.Namespace allowed: older train.py stored args so)."""
    import torch

    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def as_array(tensor: Any) -> np.ndarray:
    """A CPU tensor as a NumPy array (bfloat16, which NumPy lacks, as float32: exact)."""
    import torch

    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def compare_values(a: Any, b: Any, where: str, sides: tuple[Side, Side], out: list[str],
                   ignored: frozenset[str] = frozenset()) -> None:
    """Append a description of every difference between a and b (recursively) to out; where names the spot."""
    import torch

    if isinstance(a, argparse.Namespace) and isinstance(b, argparse.Namespace):
        a, b = vars(a), vars(b)
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                       and not isinstance(a, bool) and not isinstance(b, bool)):
        out.append(f"{where}: type {type(a).__name__} != {type(b).__name__}")
    elif isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            out.append(f"{where}: tensor {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}")
        elif not torch.equal(a, b):  # say how many elements differ (NaN == NaN there, as in a NaN-stopped run)
            compare_values(as_array(a), as_array(b), where, sides, out)
    elif isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape:
            out.append(f"{where}: array {a.dtype}{a.shape} != {b.dtype}{b.shape}")
        elif not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
            unequal = (a != b) & ~(np.isnan(a) & np.isnan(b)) if a.dtype.kind in "fc" else a != b
            out.append(f"{where}: values differ at {int(unequal.sum())} of {a.size} elements")
    elif isinstance(a, dict):
        keys_a, keys_b = set(a) - ignored, set(b) - ignored
        for key in sorted(keys_a ^ keys_b, key=str):
            out.append(f"{where}: key {key!r} only in {'A' if key in keys_a else 'B'}")
        for key in sorted(keys_a & keys_b, key=str):
            compare_values(a[key], b[key], f"{where}[{key!r}]", sides, out, ignored)
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{where}: length {len(a)} != {len(b)}")
        else:
            for index, (item_a, item_b) in enumerate(zip(a, b)):
                compare_values(item_a, item_b, f"{where}[{index}]", sides, out, ignored)
    elif isinstance(a, str):
        text_a, text_b = sides[0].normalise(a), sides[1].normalise(b)
        if PATH_HASH.sub("<hash>", text_a) != PATH_HASH.sub("<hash>", text_b):
            out.append(f"{where}: {text_a!r} != {text_b!r}")
    elif isinstance(a, float) and math.isnan(a) and math.isnan(b):
        pass
    elif a != b:
        out.append(f"{where}: {a!r} != {b!r}")


def read_png(path: Path) -> tuple[np.ndarray, str]:
    """A PNG's decoded pixels and its mode (an RGB image and a grey one differ)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image), image.mode


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def read_text(path: Path) -> list[str]:
    """A text file's lines with the wall-clock (log time stamps, train.py's speeds, the measured bf16 matmul
    ratio) as <time>, <rate> and <ratio>."""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        line = LOG_TIME.sub("<time>", line)
        line = MATMUL_RATIO.sub(r"\1<ratio>x", line)
        lines.append(RATE.sub(r"\1<rate>", line))
    return lines


WALL_CLOCK_FIELDS = ("time", "steps_per_sec", "images_per_sec")  # sit.training.metrics_log's


def read_jsonl(path: Path) -> list[Any]:
    """A .jsonl file's records, each without its wall-clock fields."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{key: value for key, value in record.items() if key not in WALL_CLOCK_FIELDS}
            if isinstance(record, dict) else record for record in records]


def compare_file(path_a: Path, path_b: Path, sides: tuple[Side, Side]) -> list[str]:
    """Descriptions of every difference between two files of the same relative path (empty: equal)."""
    suffix = path_a.suffix.lower()
    differences: list[str] = []
    if suffix in (".pt", ".pth"):
        compare_values(load_checkpoint(path_a), load_checkpoint(path_b), "", sides, differences)
    elif suffix == ".png":
        (pixels_a, mode_a), (pixels_b, mode_b) = read_png(path_a), read_png(path_b)
        compare_values(mode_a, mode_b, "mode", sides, differences)
        compare_values(pixels_a, pixels_b, "pixels", sides, differences)
    elif suffix == ".npz":
        compare_values(read_npz(path_a), read_npz(path_b), "", sides, differences)
    elif suffix == ".npy":
        compare_values(np.load(path_a, allow_pickle=False), np.load(path_b, allow_pickle=False), "", sides, differences)
    elif suffix == ".json":
        compare_values(json.loads(path_a.read_text()), json.loads(path_b.read_text()), "", sides, differences,
                       IGNORED_JSON_KEYS)
    elif suffix == ".jsonl":  # train.py's metrics.jsonl: its wall-clock fields differ between any two runs
        compare_values(read_jsonl(path_a), read_jsonl(path_b), "record", sides, differences)
    elif suffix == ".csv":
        compare_values(read_csv(path_a), read_csv(path_b), "row", sides, differences)
    elif suffix in (".txt", ".log", ".yaml"):
        compare_values(read_text(path_a), read_text(path_b), "line", sides, differences)
    elif path_a.read_bytes() != path_b.read_bytes():
        differences.append("bytes differ")
    return differences


def compare(dir_a: Path, dir_b: Path) -> int:
    """Print one line per difference between two captures and a summary line; 0 if none, else 1."""
    sides = (Side.of(dir_a), Side.of(dir_b))
    (files_a, clashes_a), (files_b, clashes_b) = list_files(sides[0]), list_files(sides[1])
    differences = 0
    for clash in clashes_a + clashes_b:
        print(f"name clash: {clash}")
        differences += 1
    for key in sorted(set(files_a) ^ set(files_b)):
        print(f"{key}: only in {'A ' + str(dir_a) if key in files_a else 'B ' + str(dir_b)}")
        differences += 1
    common = sorted(set(files_a) & set(files_b))
    for key in common:
        try:
            found = compare_file(dir_a / files_a[key], dir_b / files_b[key], sides)
        except Exception as error:  # an unreadable file is a difference, not the end of the comparison
            found = [f"cannot compare: {type(error).__name__}: {error}"]
        for difference in found:
            print(f"{key}: {difference}")
        differences += len(found)
    print(f"{len(common)} files compared, {differences} differences")
    return 0 if differences == 0 else 1


#################################################################################
#                                  Command line                                 #
#################################################################################

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the sub-command and run it; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    capture_parser = commands.add_parser("capture", help="run the command lines into OUT_DIR")
    capture_parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="a new (or empty) folder")
    capture_parser.add_argument("--repo", type=Path, default=THIS_REPO,
                                help="the repository whose scripts run (default: the one holding this file)")
    compare_parser = commands.add_parser("compare", help="compare two captures file by file")
    compare_parser.add_argument("dir_a", metavar="DIR_A", type=Path)
    compare_parser.add_argument("dir_b", metavar="DIR_B", type=Path)
    args = parser.parse_args(argv)
    if args.command == "capture":
        return capture(args.out_dir, args.repo)
    for folder in (args.dir_a, args.dir_b):
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
    return compare(args.dir_a, args.dir_b)


if __name__ == "__main__":
    sys.exit(main())
