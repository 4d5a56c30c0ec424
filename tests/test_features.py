"""extract_features.py, sit.data.extraction and the cached-latent dataset."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

import extract_features
from conftest import REPO, assert_names, make_image_folder
from sit.data.extraction import ExtractionConfig, build_meta, open_image_folder, open_feature_folder
from sit.data.features import LatentFeatureDataset, block_marker, read_meta
from sit.data.images import image_transform
from sit.data.order import flip_for
from sit.errors import UsageError


def run_extract(args, nproc=1):
    if nproc == 1:
        command = [sys.executable, "extract_features.py", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29613",
                   "extract_features.py", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, image_folder, tiny_vae):
    out = str(tmp_path_factory.mktemp("features") / "feats")
    result = run_extract(["--data-path", image_folder, "--features-path", out, "--image-size", "32", "--vae", tiny_vae,
                          "--batch-size", "3", "--block-size", "3", "--num-workers", "0", "--float32"])
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_features_equal_direct_encoding(extracted, image_folder, tiny_vae):
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    dataset = ImageFolder(image_folder, transform=image_transform(32))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, 3, 32, 32)
    with torch.no_grad():
        plain = vae.encode(images).latent_dist
        flipped = vae.encode(images.flip(dims=[3])).latent_dist
    meta = read_meta(extracted)
    assert meta["complete"] and meta["num_images"] == 8 and meta["latent_shape"] == [4, 4, 4]
    mean = np.load(os.path.join(extracted, "mean.npy"))
    std = np.load(os.path.join(extracted, "std.npy"))
    labels = np.load(os.path.join(extracted, "labels.npy"))
    np.testing.assert_allclose(mean[:, 0], plain.mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mean[:, 1], flipped.mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std[:, 0], plain.std.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(labels, np.array(dataset.targets))


@pytest.mark.slow
def test_resume_redoes_only_missing_blocks(extracted, image_folder, tiny_vae):
    mean_path = os.path.join(extracted, "mean.npy")
    before = np.load(mean_path).copy()
    # Simulate a run that died while writing the block starting at image 3.
    os.remove(block_marker(extracted, 3))
    damaged = np.load(mean_path, mmap_mode="r+")
    damaged[3:6] = 0
    damaged.flush()
    marker_time = os.path.getmtime(block_marker(extracted, 0))
    result = run_extract(["--data-path", image_folder, "--features-path", extracted, "--image-size", "32",
                          "--vae", tiny_vae, "--batch-size", "3", "--block-size", "3", "--num-workers", "0", "--float32"])
    assert result.returncode == 0, result.stderr
    assert "2 of this rank's 3 blocks already done" in result.stdout
    np.testing.assert_allclose(np.load(mean_path), before, rtol=1e-5, atol=1e-6)
    assert os.path.getmtime(block_marker(extracted, 0)) == marker_time


@pytest.mark.slow
def test_two_processes_equal_one(extracted, image_folder, tiny_vae, tmp_path):
    out = str(tmp_path / "feats2")
    result = run_extract(["--data-path", image_folder, "--features-path", out, "--image-size", "32", "--vae", tiny_vae,
                          "--batch-size", "2", "--block-size", "2", "--num-workers", "0", "--float32"], nproc=2)
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(os.path.join(out, "mean.npy")), np.load(os.path.join(extracted, "mean.npy")),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused(extracted, image_folder, tiny_vae):
    result = run_extract(["--data-path", image_folder, "--features-path", extracted, "--image-size", "64",
                          "--vae", tiny_vae, "--num-workers", "0", "--float32"])
    assert result.returncode != 0
    assert "other settings (image_size" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_image_size_is_refused(image_folder, tmp_path):
    result = run_extract(["--data-path", image_folder, "--features-path", str(tmp_path / "f"), "--image-size", "30"])
    assert result.returncode == 2 and "multiple of 8" in result.stderr


@pytest.mark.slow
def test_dataset_flips_reproducibly(extracted):
    dataset = LatentFeatureDataset(extracted, seed=3)
    mean = np.load(os.path.join(extracted, "mean.npy"))
    for epoch in range(2):
        for index in range(len(dataset)):
            side = int(flip_for(3, epoch, index))
            item_mean, item_std, label = dataset[(epoch, index)]
            np.testing.assert_array_equal(item_mean.numpy(), mean[index, side])
    flips = [flip_for(3, 0, index) for index in range(200)]
    assert 70 < sum(flips) < 130  # a fair coin


def test_incomplete_features_are_refused(tmp_path):
    with pytest.raises(ValueError, match="run extract_features.py first"):
        LatentFeatureDataset(str(tmp_path))


@pytest.mark.parametrize("flag, value", [("--image-size", "0"), ("--image-size", "-8"), ("--batch-size", "0"),
                                         ("--block-size", "-1")])
def test_sizes_must_be_positive(flag, value, image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        extract_features.main(["--data-path", image_folder, "--features-path", str(tmp_path / "f"), flag, value])
    assert error.value.code == 2
    assert_names(capsys.readouterr().err, flag, "positive")


def test_folder_without_class_folders_is_one_line(tmp_path, monkeypatch):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "image.png").write_bytes(b"")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UsageError) as error:
        extract_features.main(["--data-path", str(flat), "--features-path", str(tmp_path / "f"), "--image-size", "32"])
    assert_names(error.value, f"--data-path {flat}", "class")
    result = run_extract(["--data-path", str(flat), "--features-path", str(tmp_path / "f"), "--image-size", "32"])
    assert result.returncode == 2
    assert assert_names(result.stderr, f"--data-path {flat}", "class").startswith("extract_features.py: error: ")


def test_empty_class_and_unreadable_image_are_handled_as_in_training(tmp_path, tiny_vae, monkeypatch, capsys):
    """As train.py --data-path: an empty class folder is a class without images, and an unreadable
    image is skipped with a warning, the next image (here class1/0.png) taking its place."""
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2)
    (tmp_path / "data" / "class0" / "broken.png").write_bytes(b"not a PNG")  # index 2 of 5, after 0.png, 1.png
    (tmp_path / "data" / "class2").mkdir()
    out = str(tmp_path / "feats")
    monkeypatch.delenv("RANK", raising=False)
    extract_features.main(["--data-path", data, "--features-path", out, "--image-size", "32",
                           "--vae", tiny_vae, "--num-workers", "0", "--float32"])
    meta = read_meta(out)
    assert meta["complete"] and meta["num_images"] == 5 and meta["classes"] == ["class0", "class1", "class2"]
    assert f"warning: skipping unreadable image {os.path.join(data, 'class0', 'broken.png')}" in capsys.readouterr().err
    mean, labels = np.load(os.path.join(out, "mean.npy")), np.load(os.path.join(out, "labels.npy"))
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(mean[2], mean[3])


def test_rerun_with_another_data_path_is_refused(tmp_path, monkeypatch):
    """Same size and classes, another folder: mixing them would be silent; the same folder named
    another way (relative) is the same dataset."""
    import shutil

    first = make_image_folder(str(tmp_path / "first"), num_classes=2, per_class=1, size=16)
    second = shutil.copytree(first, str(tmp_path / "second"))
    out = str(tmp_path / "feats")

    def prepare(data_path: str) -> dict:
        config = ExtractionConfig(data_path=data_path, features_path=out, image_size=16)
        return open_feature_folder(config, open_image_folder(config))

    created = prepare(first)
    monkeypatch.chdir(tmp_path)
    assert prepare("first") == created
    with pytest.raises(UsageError) as error:
        prepare(second)
    assert_names(error.value, out, f"--data-path {second}", "--features-path")


def test_local_vae_is_stored_as_an_absolute_path(tiny_vae, image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(tiny_vae))
    args = extract_features.parse_args(["--data-path", image_folder, "--features-path", str(tmp_path / "f"),
                                        "--vae", os.path.basename(tiny_vae)])
    config = extract_features.config_from_args(args)
    meta = build_meta(config, open_image_folder(config))
    assert meta["vae"] == tiny_vae and os.path.isabs(tiny_vae)


def test_encoder_tokens_count_in_the_free_space_check_and_are_preallocated(tmp_path, monkeypatch):
    import sit.files
    from sit.data.features import arrays_bytes, open_arrays, open_token_array
    from sit.files import NoSpaceLeft

    meta = dict(image_size=64, vae="ema", num_images=10, classes=["a"], dtype="float16", block_size=4,
                latent_shape=[4, 8, 8], complete=False, repa_encoder="dinov2_vitb14", repa_tokens_shape=[16, 32])
    latents = 2 * 10 * 2 * 256 * 2 + 10 * 8  # mean and std (N, 2, 4, 8, 8) float16, labels (N,) int64
    tokens = 10 * 2 * 16 * 32 * 2  # (N, 2, T, D) float16
    assert arrays_bytes(meta) == latents + tokens
    monkeypatch.setattr(sit.files, "free_bytes", lambda path: latents + tokens // 2)  # room for the latents only
    with pytest.raises(NoSpaceLeft, match="the features of 10 images needs about"):
        open_arrays(str(tmp_path), meta, "w+")
    assert os.listdir(tmp_path) == []  # refused before any array was made
    monkeypatch.undo()
    open_arrays(str(tmp_path), meta, "w+")
    open_token_array(str(tmp_path), meta, "w+")
    assert os.stat(tmp_path / "repa_tokens.npy").st_blocks * 512 >= tokens  # reserved, not sparse


def test_a_run_refused_the_lock_keeps_the_folder_another_run_created_meanwhile(image_folder, tmp_path, monkeypatch):
    import fcntl

    from sit.locks import LOCK_FILE

    features = tmp_path / "f"  # missing when the run starts: it counts as created by this run
    setup = extract_features.setup_distributed
    holder = []

    def another_run_takes_the_folder():  # what a second run started at the same moment does meanwhile
        features.mkdir()
        holder.append(os.open(features / LOCK_FILE, os.O_RDWR | os.O_CREAT))
        fcntl.flock(holder[0], fcntl.LOCK_EX)
        return setup()

    monkeypatch.setattr(extract_features, "setup_distributed", another_run_takes_the_folder)
    try:
        with pytest.raises(UsageError, match="is in use by"):
            extract_features.main(["--data-path", image_folder, "--features-path", str(features), "--image-size", "32"])
        assert os.listdir(features) == [LOCK_FILE]  # the other run's folder and lock are left alone
    finally:
        os.close(holder[0])
