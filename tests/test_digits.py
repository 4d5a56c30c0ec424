"""A real learning check: a class-conditional pixel-space SiT learns scikit-learn's 8x8 digits on the CPU.

export_digits.py writes the 1,797 digits as an ImageFolder; train.py trains a small SiT on it
(--vae none); the README's commands sample it (`--ckpt results`): sample.py the one-row-per-class
figure, sample_ddp.py images whose labels its .npz holds; an SVC trained on the real digits must
recognise the class each sample was conditioned on. The samples' nearest-
neighbour distances to the training set are reported beside the training set's own, so that
memorisation would be visible, and no sample may be an exact copy of a training digit.
"""
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import export_digits
from conftest import REPO
from sit.files import atomic_write
from sit.generation import noise_and_labels

NUM_CLASSES = 10
MODEL_CONFIG = {"patch_size": 2, "hidden_size": 64, "depth": 4, "num_heads": 4, "learn_sigma": False}
TRAIN_STEPS = 1000
NUM_SAMPLES = 200
SAMPLE_SEED = 0
CFG_SCALE = 1.5
README_FIGURE = os.path.join(REPO, "docs", "digits_grid.png")


def test_export_digits_writes_an_image_folder(tmp_path):
    export_digits.main([str(tmp_path / "digits")])
    folders = sorted(os.listdir(tmp_path / "digits"))
    assert folders == [f"class{label:02d}" for label in range(NUM_CLASSES)]
    images, labels = export_digits.digits_uint8()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and set(labels) == set(range(NUM_CLASSES))
    assert images.min() == 0 and images.max() == 255  # levels 0..16 scaled to 0..255
    assert sum(len(os.listdir(tmp_path / "digits" / folder)) for folder in folders) == 1797
    # an image comes back exactly, grey in all three channels, in the folder of its label
    index = 5
    pixels = np.asarray(Image.open(tmp_path / "digits" / f"class{labels[index]:02d}" / f"{index:04d}.png"))
    assert pixels.shape == (8, 8, 3)
    assert np.array_equal(pixels[:, :, 0], images[index]) and np.array_equal(pixels[:, :, 2], images[index])


def run_script(script: str, args: list, cwd: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd, env=env, text=True,
                            capture_output=True, timeout=timeout)
    assert result.returncode == 0, f"{script} exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def digit_classifier():
    """SVC(gamma=0.001) on the 64 grey levels 0..16 of the real digits; also its held-out accuracy."""
    from sklearn.svm import SVC

    images, labels = export_digits.digits_uint8()
    features = images.reshape(len(images), 64) / 255.0 * 16  # back to the digits' 0..16 scale
    held_out = SVC(gamma=0.001).fit(features[:1200], labels[:1200]).score(features[1200:], labels[1200:])
    return SVC(gamma=0.001).fit(features, labels), held_out


def nearest_neighbour_distances(queries: np.ndarray, references: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """Euclidean distance (grey levels 0..255) from each query (Q, 64) to its nearest reference (R, 64)."""
    distances = torch.cdist(torch.tensor(queries, dtype=torch.float64), torch.tensor(references, dtype=torch.float64))
    if exclude_self:
        distances.fill_diagonal_(float("inf"))
    return distances.min(dim=1).values.numpy()


def save_class_grid(samples: np.ndarray, labels: np.ndarray, path: str, per_class: int = 10, zoom: int = 4) -> None:
    """One row per class of up to per_class samples (N, 8, 8) uint8, zoomed, as a PNG (written atomically)."""
    from torchvision.utils import save_image

    rows = []
    for label in range(NUM_CLASSES):
        chosen = samples[labels == label][:per_class]
        row = np.zeros((per_class, 8, 8), dtype=np.uint8)
        row[: len(chosen)] = chosen
        rows.append(row)
    grid = torch.tensor(np.concatenate(rows), dtype=torch.float32)[:, None] / 255.0  # (10 * per_class, 1, 8, 8)
    grid = torch.nn.functional.interpolate(grid, scale_factor=zoom, mode="nearest")   # (.., 1, 8 zoom, 8 zoom)
    atomic_write(path, functools.partial(save_image, grid, nrow=per_class, padding=2, pad_value=0.5), suffix=".png")


def save_enlarged(source: str, path: str, zoom: int = 4) -> None:
    """The PNG at source, enlarged zoom times (nearest neighbour: the pixels stay sharp), as a PNG at path."""
    with Image.open(source) as image:
        image.resize((image.width * zoom, image.height * zoom), Image.NEAREST).save(path, format="PNG")


@pytest.mark.slow
def test_sit_learns_the_digits_on_the_cpu(tmp_path):
    data = str(tmp_path / "digits")
    export_digits.main([data])
    results = str(tmp_path / "results")
    run_script("train.py", [
        "--data-path", data, "--results-dir", results, "--vae", "none", "--image-size", "8", "--model", "SiT-S/2",
        "--num-classes", str(NUM_CLASSES), "--model-config", json.dumps(MODEL_CONFIG), "--no-random-flip",
        "--lr", "2e-3", "--ema-decay", "0.99", "--global-batch-size", "128", "--max-steps", str(TRAIN_STEPS),
        "--num-workers", "0", "--log-every", "100", "--ckpt-every", str(TRAIN_STEPS), "--sample-every", str(TRAIN_STEPS),
        "--cfg-scale", str(CFG_SCALE)], str(tmp_path))
    (experiment,) = os.listdir(results)
    assert experiment == "000-custom-d4-w64-p2-Linear-velocity-None"  # named after the real shape
    ckpt = os.path.join(results, experiment, "checkpoints", f"{TRAIN_STEPS:07d}.pt")
    with open(os.path.join(results, experiment, "latest.txt")) as handle:
        assert handle.read() == os.path.abspath(ckpt) + "\n"

    # the README's figure command: --ckpt results takes the newest checkpoint, one row per class
    figure = str(tmp_path / "digits.png")
    run_script("sample.py", [
        "ODE", "--ckpt", results, "--class-labels", ",".join(map(str, range(NUM_CLASSES))), "--num-images",
        str(4 * NUM_CLASSES), "--one-row-per-label", "--sampling-method", "euler", "--num-sampling-steps", "50",
        "--cfg-scale", str(CFG_SCALE), "--output", figure], str(tmp_path))
    with open(tmp_path / "digits.labels.txt") as handle:
        assert handle.read() == "".join(f"{label} {label} {label} {label}\n" for label in range(NUM_CLASSES))

    sample_dir = str(tmp_path / "samples")
    run_script("sample_ddp.py", [
        "ODE", "--ckpt", results, "--sample-dir", sample_dir, "--num-fid-samples", str(NUM_SAMPLES),
        "--per-proc-batch-size", "100", "--sampling-method", "euler", "--num-sampling-steps", "50",
        "--cfg-scale", str(CFG_SCALE), "--global-seed", str(SAMPLE_SEED)], str(tmp_path))
    (npz,) = [name for name in os.listdir(sample_dir) if name.endswith(".npz")]
    with np.load(os.path.join(sample_dir, npz)) as batch:
        pixels, labels = batch["arr_0"], batch["labels"]  # (N, 8, 8, 3) uint8, (N,) the conditioning
    assert pixels.shape == (NUM_SAMPLES, 8, 8, 3)
    samples = np.rint(pixels.astype(np.float64).mean(axis=3)).astype(np.uint8)  # (N, 8, 8) grey
    # sample_ddp draws image i's label from the generator seeded by (global seed, i): the saved labels are those
    _, conditioned = noise_and_labels(range(NUM_SAMPLES), SAMPLE_SEED, (3, 8, 8), NUM_CLASSES)
    assert np.array_equal(labels, conditioned.numpy())

    classifier, held_out_accuracy = digit_classifier()
    predicted = classifier.predict(samples.reshape(NUM_SAMPLES, 64) / 255.0 * 16)
    accuracy = float(np.mean(predicted == labels))
    grid = np.asarray(Image.open(figure).convert("L"))  # 10 rows of 4 cells of 8 px, 2 px padding
    cells = np.stack([grid[2 + 10 * row:10 + 10 * row, 2 + 10 * column:10 + 10 * column]
                      for row in range(NUM_CLASSES) for column in range(4)])
    figure_accuracy = float(np.mean(classifier.predict(cells.reshape(-1, 64) / 255.0 * 16)
                                    == np.repeat(np.arange(NUM_CLASSES), 4)))

    real, _ = export_digits.digits_uint8()
    real_flat = real.reshape(len(real), 64).astype(np.float64)
    sample_nn = nearest_neighbour_distances(samples.reshape(NUM_SAMPLES, 64).astype(np.float64), real_flat)
    real_nn = nearest_neighbour_distances(real_flat, real_flat, exclude_self=True)

    grid_path = str(tmp_path / "digits_grid.png")
    save_class_grid(samples, labels, grid_path)
    if os.environ.get("SIT_UPDATE_README_FIGURE") == "1":  # a test run leaves the tracked files alone otherwise
        atomic_write(README_FIGURE, functools.partial(save_enlarged, figure), suffix=".png")
    report = (f"digits: SVC held-out accuracy on real digits {held_out_accuracy:.3f}; {NUM_SAMPLES} samples after "
              f"{TRAIN_STEPS} steps (cfg {CFG_SCALE}) classified as their class: {accuracy:.3f}; the README figure's "
              f"40: {figure_accuracy:.3f}\n"
              f"nearest-neighbour distance to the training set (grey levels, L2 over 64 pixels): samples median "
              f"{np.median(sample_nn):.1f} (min {sample_nn.min():.1f}); training digits to each other median "
              f"{np.median(real_nn):.1f} (min {real_nn.min():.1f})\ngrid (one row per class): {grid_path}")
    print(report)
    with open(tmp_path / "report.txt", "w") as handle:
        handle.write(report + "\n")

    assert held_out_accuracy > 0.9
    assert accuracy >= 0.8 and figure_accuracy >= 0.8, report
    assert sample_nn.min() > 0, report  # no sample is an exact copy of a training digit
