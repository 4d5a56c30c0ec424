"""sit.data.images: the one image reader (every mode to RGB with exact values, refusals naming the
file), and TrainImageFolder built on it (unreadable images skipped, none readable: one line)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_names, make_image_folder
from sit.data.images import (ImageRefused, TrainImageFolder, composite_over_white, read_rgb, scale_16_bit,
                             to_rgb)
from sit.errors import UsageError


def saved(tmp_path, image: Image.Image, name: str = "image.png") -> str:
    path = str(tmp_path / name)
    image.save(path)
    return path


def channels(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of an RGB image, after checking its three channels are equal (a grey image)."""
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    return pixels[..., 0]


SIXTEEN_BIT = np.array([[0, 128, 129, 257, 1000, 32768, 65278, 65535]], dtype=np.uint16)
# round(v / 257): 128/257 = 0.498, 129/257 = 0.502, 1000/257 = 3.89, 32768/257 = 127.5019, 65278 = 254 * 257
EXPECTED_8_BIT = np.array([[0, 0, 1, 1, 4, 128, 254, 255]], dtype=np.uint8)


def test_16_bit_values_are_scaled_by_257_with_rounding_not_clipped():
    assert np.array_equal(scale_16_bit(SIXTEEN_BIT), EXPECTED_8_BIT)
    every = np.arange(65536, dtype=np.uint16)
    assert np.array_equal(scale_16_bit(every), np.floor(every / 257 + 0.5).astype(np.uint8))
    assert np.array_equal(scale_16_bit(np.arange(256, dtype=np.uint16) * 257), np.arange(256))  # 8-bit as 16: itself


def test_a_16_bit_png_reads_as_its_scaled_grey_not_as_white(tmp_path):
    path = saved(tmp_path, Image.fromarray(SIXTEEN_BIT))
    assert Image.open(path).mode == "I;16"
    assert np.array_equal(channels(read_rgb(path)), EXPECTED_8_BIT)
    pillow_own = np.asarray(Image.open(path).convert("RGB"))[..., 0]  # what a plain .convert("RGB") gives: clipped
    assert np.array_equal(pillow_own, np.minimum(SIXTEEN_BIT, 255))


def test_big_endian_16_bit_and_32_bit_integer_modes(tmp_path):
    big_endian = Image.frombytes("I;16B", (8, 1), SIXTEEN_BIT.astype(">u2").tobytes())
    assert np.array_equal(channels(to_rgb(big_endian, "x")), EXPECTED_8_BIT)
    as_int32 = Image.fromarray(SIXTEEN_BIT.astype(np.int32))
    assert as_int32.mode == "I"
    assert np.array_equal(channels(to_rgb(as_int32, "x")), EXPECTED_8_BIT)
    for outside in (-1, 65536):
        with pytest.raises(ImageRefused) as error:
            to_rgb(Image.fromarray(np.array([[0, outside]], dtype=np.int32)), "img.tif")
        assert_names(error.value, "img.tif", "0..65535")


def test_float_images_are_refused_naming_the_file():
    with pytest.raises(ImageRefused) as error:
        to_rgb(Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32)), "a/b.tif")
    assert_names(error.value, "a/b.tif", "float")


def test_alpha_is_composited_over_white_with_exact_rounding(tmp_path):
    rgba = np.array([[[100, 0, 255, 0], [100, 0, 255, 255], [100, 0, 255, 128], [10, 20, 30, 1]]], dtype=np.uint8)
    # round((c a + 255 (255 - a)) / 255): a=0 -> 255; a=255 -> c; a=128, c=100 -> 45185/255 = 177.2 -> 177
    expected = np.array([[[255, 255, 255], [100, 0, 255], [177, 127, 255], [254, 254, 254]]], dtype=np.uint8)
    assert np.array_equal(composite_over_white(rgba), expected)
    assert np.array_equal(np.asarray(read_rgb(saved(tmp_path, Image.fromarray(rgba, "RGBA")))), expected)
    grey_alpha = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert np.array_equal(channels(read_rgb(saved(tmp_path, grey_alpha, "la.png"))), expected[..., 0])


def test_palette_grey_bilevel_and_cmyk_modes(tmp_path):
    palette = Image.new("P", (3, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 759)
    palette.putdata([0, 1, 2])
    assert np.array_equal(np.asarray(read_rgb(saved(tmp_path, palette, "p.png"))), [[[10, 20, 30], [40, 50, 60], [70, 80, 90]]])
    palette.info["transparency"] = 1  # index 1 transparent: white, not its colour
    assert np.array_equal(np.asarray(to_rgb(palette, "x")), [[[10, 20, 30], [255, 255, 255], [70, 80, 90]]])
    grey = Image.fromarray(np.array([[0, 7, 255]], dtype=np.uint8), "L")
    assert np.array_equal(channels(read_rgb(saved(tmp_path, grey, "l.png"))), [[0, 7, 255]])
    bilevel = Image.fromarray(np.array([[0, 255]], dtype=np.uint8), "L").convert("1")
    assert np.array_equal(channels(read_rgb(saved(tmp_path, bilevel, "one.png"))), [[0, 255]])
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (100, 50, 0, 128)])
    # 255 (1 - C/255)(1 - K/255): 155 * 127 / 255 = 77.2, 205 * 127 / 255 = 102.1, 255 * 127 / 255 = 127
    assert np.array_equal(np.asarray(to_rgb(cmyk, "x")), [[[255, 255, 255], [77, 102, 127]]])


def test_decompression_bombs_and_non_regular_files_are_refused_without_decoding(tmp_path, monkeypatch):
    path = saved(tmp_path, Image.new("RGB", (4, 4)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12)
    with pytest.raises(ImageRefused) as error:
        read_rgb(path)
    assert_names(error.value, path, "4x4", "12")  # its size and the limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5)  # over twice the limit: Pillow's own refusal, file named
    with pytest.raises(ImageRefused) as error:
        read_rgb(path)
    assert_names(error.value, path, "16 pixels")
    fifo = str(tmp_path / "pipe.png")
    os.mkfifo(fifo)
    with pytest.raises(ImageRefused) as error:  # opening it would block
        read_rgb(fifo)
    assert_names(error.value, fifo, "regular file")


def test_train_folder_skips_unreadable_images_with_one_warning_each(tmp_path, capsys):
    root = make_image_folder(str(tmp_path / "data"), num_classes=1, per_class=2, size=16)
    broken = os.path.join(root, "class0", "0-broken.png")
    with open(broken, "wb") as handle:
        handle.write(b"not a png")
    grey16 = os.path.join(root, "class0", "0-grey16.png")
    Image.fromarray(np.full((16, 16), 65535 // 2, dtype=np.uint16)).save(grey16)
    dataset = TrainImageFolder(root, 16, random_flip=False)
    assert [os.path.basename(path) for path, _ in dataset.samples] == ["0-broken.png", "0-grey16.png", "0.png", "1.png"]
    warning = (f"warning: skipping unreadable image {broken} (not an image file Pillow can identify: empty, "
               f"damaged or another kind of file)\n")
    assert capsys.readouterr().err == warning  # the first readable image was looked for at construction
    image, label = dataset[0]  # the broken one: the next readable image takes its place
    assert label == 0 and torch.equal(image, dataset[1][0])
    assert torch.allclose(dataset[1][0], torch.full((3, 16, 16), 127 / 127.5 - 1))  # 32767 / 257 = 127.498 -> 127
    assert capsys.readouterr().err == ""  # warned once per file


def test_a_folder_of_unreadable_images_is_one_line(tmp_path, capsys):
    for name in ("a", "b"):
        os.makedirs(tmp_path / "data" / name)
        (tmp_path / "data" / name / "x.png").write_bytes(b"")
    with pytest.raises(UsageError) as raised:
        TrainImageFolder(str(tmp_path / "data"), 16)
    path = tmp_path / "data" / "a" / "x.png"
    assert_names(raised.value, f"--data-path {tmp_path / 'data'}", "2 images", str(path))  # how many, an example
    assert capsys.readouterr().err == ""
