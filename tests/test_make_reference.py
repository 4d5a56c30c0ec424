"""make_reference.py: an image folder becomes the reference .npz one would build by hand with ADM's center
crop, and evaluate.py gives both the same statistics."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import make_reference
from conftest import random_inception_state_dict
from sit import metrics
from sit.errors import UsageError

SIZE = 16


def adm_crop_by_hand(path: str, size: int) -> np.ndarray:
    """ADM's center_crop_arr written out again: box-halve while the short side is >= 2 size, bicubic to
    a short side of size, then the center size x size square."""
    image = Image.open(path).convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    pixels = np.array(image)  # (H, W, 3)
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top:top + size, left:left + size]


@pytest.fixture()
def folder(tmp_path):
    """Two classes of images of various sizes and modes (RGB, grey, RGBA), and one file that is no image."""
    rng = np.random.default_rng(3)
    shapes = {"cats": [(40, 70), (64, 64), (33, 17)], "dogs": [(90, 50), (16, 16), (128, 40)]}
    for name, sizes in shapes.items():
        os.makedirs(tmp_path / "images" / name)
        for index, (height, width) in enumerate(sizes):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert(["RGB", "L", "RGBA"][index])
            image.save(tmp_path / "images" / name / f"{index}.png")
    (tmp_path / "images" / "dogs" / "broken.png").write_bytes(b"not an image")
    return tmp_path


def test_the_reference_equals_the_npz_built_by_hand_and_gives_the_same_statistics(folder, capsys):
    make_reference.main([str(folder / "images"), str(folder / "ref.npz"), "--image-size", str(SIZE)])
    assert "skipping unreadable image" in capsys.readouterr().err  # broken.png, named
    paths = [(folder / "images" / name / f"{index}.png", label) for label, name in enumerate(["cats", "dogs"])
             for index in range(3)]
    by_hand = np.stack([adm_crop_by_hand(str(path), SIZE) for path, _ in paths])  # (6, 16, 16, 3)
    with np.load(folder / "ref.npz") as made:
        assert made["arr_0"].dtype == np.uint8 and made["arr_0"].shape == (6, SIZE, SIZE, 3)
        np.testing.assert_array_equal(made["arr_0"], by_hand)
        np.testing.assert_array_equal(made["labels"], [label for _, label in paths])
    np.savez(folder / "by_hand.npz", arr_0=by_hand)

    weights = str(folder / "inception.pth")
    torch.save(random_inception_state_dict(seed=0), weights)
    for name in ("ref", "by_hand"):  # evaluate.py with a reference alone caches its statistics
        evaluate.main([str(folder / f"{name}.npz"), "--device", "cpu", "--batch-size", "4", "--inception-weights", weights])
    with np.load(folder / "ref.stats.npz") as made, np.load(folder / "by_hand.stats.npz") as hand:
        for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
            np.testing.assert_array_equal(made[key], hand[key])
        assert made["mu"].shape == (metrics.POOL_DIM,)


def test_max_images_keeps_a_seeded_subset_in_listing_order(folder):
    everything, labels = make_reference.make_reference(str(folder / "images"), SIZE)
    subset, subset_labels = make_reference.make_reference(str(folder / "images"), SIZE, max_images=3, seed=1)
    again, _ = make_reference.make_reference(str(folder / "images"), SIZE, max_images=3, seed=1)
    np.testing.assert_array_equal(subset, again)
    rows = [next(i for i in range(len(everything)) if np.array_equal(everything[i], image)) for image in subset]
    assert rows == sorted(rows) and len(set(rows)) == 3
    np.testing.assert_array_equal(subset_labels, labels[rows])


def test_bad_input_is_one_usage_error(tmp_path):
    with pytest.raises(UsageError, match="is not a folder"):
        make_reference.main([str(tmp_path / "missing"), str(tmp_path / "ref.npz"), "--image-size", "8"])
    os.makedirs(tmp_path / "flat")
    with pytest.raises(UsageError, match="holds no class folders"):
        make_reference.main([str(tmp_path / "flat"), str(tmp_path / "ref.npz"), "--image-size", "8"])
    with pytest.raises(UsageError, match="name a .npz file"):
        make_reference.main([str(tmp_path / "flat"), str(tmp_path / "ref.png"), "--image-size", "8"])
    assert not os.path.exists(tmp_path / "ref.npz")
