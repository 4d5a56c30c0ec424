"""benchmarks/equivalence.py compare: equal trees give 0 differences; a one-element change of any kind of
file, a missing file and an extra file are each reported by name. (No capture here: that runs the scripts.)"""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO

SPEC = importlib.util.spec_from_file_location("equivalence", os.path.join(REPO, "benchmarks", "equivalence.py"))
equivalence = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = equivalence  # dataclasses look their module up there
SPEC.loader.exec_module(equivalence)

CHECKPOINT = "train/000-run/checkpoints/0000002.pt"
PNG = "sample/grid.png"
NPZ = "sample_ddp/model-0000002-1a2b3c4d-32px.npz"
JSON = "sample_ddp/model-0000002-1a2b3c4d-32px.json"


def build_tree(root, checkpoint_hash: str = "1a2b3c4d") -> None:
    """A capture-like tree: a checkpoint, a PNG, an .npz and its .json record; absolute paths inside point into root."""
    for name in (CHECKPOINT, PNG, NPZ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
    weights = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    torch.save({"model": {"weight": weights, "bias": torch.zeros(3)}, "ema": {"weight": weights.clone()},
                "train_steps": 2, "args": {"lr": 1e-4, "data_path": str(root / "inputs" / "images")},
                "experiment_dir": str(root / "train" / "000-run"),
                "rng": [{"cpu": torch.arange(4, dtype=torch.uint8)}]},
               root / CHECKPOINT)
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(root / PNG)
    np.savez(root / NPZ.replace("1a2b3c4d", checkpoint_hash), arr_0=np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3),
             labels=np.array([1]))
    record = {"checkpoint": str(root / CHECKPOINT), "checkpoint_sha256": os.urandom(8).hex(), "nfe": 3,
              "sampler_settings": {"atol": 1e-6, "path_type": "Linear"}}
    (root / JSON.replace("1a2b3c4d", checkpoint_hash)).write_text(json.dumps(record))


def run_compare(dir_a, dir_b, capsys) -> tuple[int, list[str]]:
    code = equivalence.compare(dir_a, dir_b)
    return code, capsys.readouterr().out.splitlines()


@pytest.fixture
def trees(tmp_path):
    """Two equal trees in differently named folders (their absolute paths and path hashes differ)."""
    dir_a, dir_b = tmp_path / "capture_a", tmp_path / "b"
    build_tree(dir_a)
    build_tree(dir_b, checkpoint_hash="99ffee00")
    return dir_a, dir_b


def test_equal_trees_give_no_difference(trees, capsys):
    code, lines = run_compare(*trees, capsys)
    assert code == 0
    assert lines == ["4 files compared, 0 differences"]


def change_checkpoint(root) -> None:
    checkpoint = torch.load(root / CHECKPOINT, weights_only=True)
    checkpoint["model"]["weight"][1, 2] += 1
    torch.save(checkpoint, root / CHECKPOINT)


def change_counter(root) -> None:
    checkpoint = torch.load(root / CHECKPOINT, weights_only=True)
    checkpoint["train_steps"] = 3
    torch.save(checkpoint, root / CHECKPOINT)


def change_png(root) -> None:
    pixels = np.asarray(Image.open(root / PNG)).copy()
    pixels[3, 3, 2] ^= 1
    Image.fromarray(pixels).save(root / PNG)


def change_npz(root) -> None:
    path = root / NPZ.replace("1a2b3c4d", "99ffee00")
    arrays = dict(np.load(path))
    arrays["labels"] = np.array([0])
    np.savez(path, **arrays)


def change_json(root) -> None:
    path = root / JSON.replace("1a2b3c4d", "99ffee00")
    record = json.loads(path.read_text())
    record["sampler_settings"]["atol"] = 1e-5
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("change, name, detail", [
    (change_checkpoint, CHECKPOINT, "['model']['weight']: values differ at 1 of 6 elements"),
    (change_counter, CHECKPOINT, "['train_steps']: 2 != 3"),
    (change_png, PNG, "pixels: values differ at 1 of 48 elements"),
    (change_npz, "sample_ddp/model-0000002-<hash>-32px.npz", "['labels']: values differ at 1 of 1 elements"),
    (change_json, "sample_ddp/model-0000002-<hash>-32px.json", "['sampler_settings']['atol']: 1e-06 != 1e-05"),
])
def test_a_one_element_change_is_reported_with_its_file(trees, capsys, change, name, detail):
    change(trees[1])
    code, lines = run_compare(*trees, capsys)
    assert code == 1
    assert lines == [f"{name}: {detail}", "4 files compared, 1 differences"]


def test_missing_and_extra_files_are_reported(trees, capsys):
    dir_a, dir_b = trees
    os.remove(dir_b / PNG)
    (dir_b / "sample" / "extra.txt").write_text("new\n")
    code, lines = run_compare(dir_a, dir_b, capsys)
    assert code == 1
    assert f"{PNG}: only in A {dir_a}" in lines and f"sample/extra.txt: only in B {dir_b}" in lines
    assert lines[-1] == "3 files compared, 2 differences"


def test_a_path_outside_the_capture_is_a_difference(trees, capsys):
    dir_a, dir_b = trees
    checkpoint = torch.load(dir_b / CHECKPOINT, weights_only=True)
    checkpoint["args"]["data_path"] = "/elsewhere/images"
    torch.save(checkpoint, dir_b / CHECKPOINT)
    code, lines = run_compare(dir_a, dir_b, capsys)
    assert code == 1
    assert lines[0] == f"{CHECKPOINT}: ['args']['data_path']: '<OUT>/inputs/images' != '/elsewhere/images'"
