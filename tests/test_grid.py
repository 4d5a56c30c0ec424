"""sit.grid: where each image of a grid goes, the grid PNG and its labels file; used by sample.py
(--one-row-per-label) and by training's preview grids (<experiment>/preview_labels.txt)."""
import os

import numpy as np
import torch
from PIL import Image
from torchvision.utils import save_image

import sample
from models import SiT
from sit.config import TransportConfig
from sit.grid import GridLayout, label_rows, labels_path, save_grid, save_labels
from sit.training.preview import preview_inputs, save_preview

PIXEL_MODEL = dict(input_size=4, in_channels=3, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                   learn_sigma=False)
CELL = 4 + 2  # 4 px images, make_grid's 2 px padding


def pixel_checkpoint(path) -> str:
    """A train.py-shaped checkpoint of a tiny pixel-space SiT (no VAE) with random weights."""
    torch.manual_seed(0)
    model = SiT(**PIXEL_MODEL)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    state = model.state_dict()
    args = dict(model="SiT-S/2", image_size=4, num_classes=10, vae="none", path_type="Linear", prediction="velocity",
                loss_weight=None, train_eps=None, sample_eps=None)
    torch.save({"model": state, "ema": state, "opt": {}, "args": args, "model_config": model.config,
                "train_steps": 1}, path)
    return str(path)


def cell(grid: np.ndarray, row: int, column: int) -> np.ndarray:
    """The (4, 4, 3) image at a grid cell."""
    top, left = 2 + row * CELL, 2 + column * CELL
    return grid[top:top + 4, left:left + 4]


def test_layouts_place_images_row_by_row_or_one_row_per_label(tmp_path):
    assert GridLayout.with_columns(6, 4) == GridLayout(2, 4)
    assert GridLayout.with_columns(6, 4).cells(6) == [0, 1, 2, 3, 4, 5, None, None]
    by_label = GridLayout.one_row_per_label(7, 3)  # labels a b c a b c a
    assert by_label == GridLayout(3, 3, column_major=True)
    assert by_label.cells(7) == [0, 3, 6, 1, 4, None, 2, 5, None]
    assert label_rows([5, 8, 9, 5, 8, 9, 5], by_label) == ["5 5 5", "8 8 .", "9 9 ."]
    save_labels([7, 1, 2], GridLayout.with_columns(3, 2), str(tmp_path / "grid.labels.txt"))
    assert (tmp_path / "grid.labels.txt").read_text() == "7 1\n2 .\n"
    assert labels_path("out/grid.png") == "out/grid.labels.txt"


def test_a_row_major_grid_is_torchvisions_own_and_one_row_per_label_moves_the_same_images(tmp_path):
    images = torch.rand(6, 3, 4, 4) * 2 - 1
    save_grid(images, GridLayout.with_columns(6, 4), str(tmp_path / "grid.png"))
    save_image(images, str(tmp_path / "reference.png"), nrow=4, normalize=True, value_range=(-1, 1))
    assert (tmp_path / "grid.png").read_bytes() == (tmp_path / "reference.png").read_bytes()
    save_grid(images, GridLayout.one_row_per_label(6, 3), str(tmp_path / "by_label.png"))
    plain = np.asarray(Image.open(tmp_path / "grid.png"))
    by_label = np.asarray(Image.open(tmp_path / "by_label.png"))
    assert by_label.shape == (3 * CELL + 2, 2 * CELL + 2, 3)
    for index in range(6):  # image i: (i // 4, i % 4) row by row; (i % 3, i // 3) one row per label
        assert np.array_equal(cell(by_label, index % 3, index // 3), cell(plain, index // 4, index % 4))


def test_sample_py_one_row_per_label_and_its_labels_file(tmp_path, capsys):
    ckpt = pixel_checkpoint(tmp_path / "model.pt")
    common = ["ODE", "--ckpt", ckpt, "--sampling-method", "euler", "--num-sampling-steps", "3", "--cfg-scale", "1.5",
              "--class-labels", "3,1,4", "--num-images", "6"]
    sample.main([*common, "--output", str(tmp_path / "plain.png")])
    sample.main([*common, "--one-row-per-label", "--output", str(tmp_path / "rows.png")])
    # the labels file says which class each cell was conditioned on: --class-labels, repeated to fill 6 images
    assert (tmp_path / "plain.labels.txt").read_text() == "3 1 4 3\n1 4 . .\n"
    assert (tmp_path / "rows.labels.txt").read_text() == "3 3\n1 1\n4 4\n"
    assert "by grid row (as in " + str(tmp_path / "rows.labels.txt") + "): 3 3 | 1 1 | 4 4" in capsys.readouterr().out
    plain, rows = np.asarray(Image.open(tmp_path / "plain.png")), np.asarray(Image.open(tmp_path / "rows.png"))
    assert plain.shape == (2 * CELL + 2, 4 * CELL + 2, 3) and rows.shape == (3 * CELL + 2, 2 * CELL + 2, 3)
    for index in range(6):  # the same seeded images, one row per label
        assert np.array_equal(cell(rows, index % 3, index // 3), cell(plain, index // 4, index % 4))


def test_preview_grids_save_their_labels_as_the_grid_shows_them(tmp_path):
    torch.manual_seed(0)
    ema = SiT(**PIXEL_MODEL).eval()
    inputs = preview_inputs(7, ema.config)
    path, labels_file = str(tmp_path / "samples" / "0000010.png"), str(tmp_path / "preview_labels.txt")
    save_preview(ema, None, TransportConfig().build(), inputs, 1.0, path, torch.device("cpu"), labels_file)
    labels = inputs[1].tolist()
    assert Image.open(path).size == (4 * CELL + 2, 4 * CELL + 2)
    expected = "".join(" ".join(str(label) for label in labels[row * 4:row * 4 + 4]) + "\n" for row in range(4))
    assert (tmp_path / "preview_labels.txt").read_text() == expected
    assert os.listdir(tmp_path / "samples") == ["0000010.png"]


def test_save_labels_returns_where_it_wrote(tmp_path):
    path = save_labels([1, 2, 3, 4], GridLayout.with_columns(4, 2), labels_path(str(tmp_path / "grid.jpg")))
    assert path == str(tmp_path / "grid.labels.txt") and open(path).read() == "1 2\n3 4\n"
