"""The LatentSpace interface (sit.latents): shapes of SD-VAE latents and pixels, normalisation, the
recorded names, equality with the formulas the training and sampling code used before it, and the
recipe of docs/ARCHITECTURE.md: a latent space added from this file alone trains and samples."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sample
import train
from conftest import assert_names, make_image_folder
from models import SiT
from sit.checkpoint import checkpoint_info, settings_of
from sit.errors import UsageError
from sit.latents import (LATENT_SPACES, SD_VAE_SCALE, AutoencoderKLSpace, LatentSpace, Normalisation, PixelSpace,
                         as_latent_space, canonical_latent_space_name, latent_space, load_latent_space,
                         recorded_latent_space)
from sit.training.step import TrainStep, train_step, training_latents
from transport import create_transport

CPU = torch.device("cpu")
TINY_CONFIG = {"depth": 1, "hidden_size": 32, "num_heads": 2}


def images(count: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(count, 3, size, size) in [-1, 1]."""
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def sd_space(tiny_vae) -> AutoencoderKLSpace:
    """The tiny random AutoencoderKL (SD-VAE's layout at tiny widths) as a loaded latent space."""
    return load_latent_space(tiny_vae, CPU)


#################################################################################
#                     Shapes, geometry and names                                #
#################################################################################

def test_autoencoder_space_shapes(sd_space):
    x = images(2, 32)
    assert (sd_space.channels, sd_space.downsampling) == (4, 8)
    assert sd_space.encode(x).shape == sd_space.encode(x, sample=False).shape == (2, 4, 4, 4)
    mean, std = sd_space.posterior(x)
    assert mean.shape == std.shape == (2, 4, 4, 4)
    assert sd_space.decode(torch.randn(2, 4, 4, 4)).shape == (2, 3, 32, 32)
    assert (sd_space.input_size(256), sd_space.image_size(32)) == (32, 256)
    sd_space.check_image_size(64)
    assert_names(pytest.raises(UsageError, sd_space.check_image_size, 60).value, "--image-size", "8", "60")


def test_pixel_space_is_the_identity():
    space = latent_space("none")
    x = images(2, 12)
    assert (space.channels, space.downsampling, space.pixel_space) == (3, 1, True)
    assert space.encode(x) is x and space.normalise(x) is x and space.denormalise(x) is x
    assert torch.equal(space.decode(x * 3), (x * 3).clamp(-1, 1))
    mean, std = space.posterior(x)
    assert mean is x and not std.any()
    assert (space.input_size(12), space.image_size(12)) == (12, 12)
    space.check_image_size(13)  # any size


def test_recorded_names_are_the_vae_flag_values(tiny_vae, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(tiny_vae))
    relative = os.path.basename(tiny_vae)
    assert [latent_space(name).name for name in ("ema", "mse", "none")] == ["ema", "mse", "none"]
    assert canonical_latent_space_name(relative) == tiny_vae  # a local folder: its absolute path
    assert [canonical_latent_space_name(name) for name in ("ema", "mse", "none")] == ["ema", "mse", "none"]
    assert latent_space(tiny_vae).name == tiny_vae and not latent_space(tiny_vae).pixel_space
    error = pytest.raises(UsageError, latent_space, str(tmp_path / "missing")).value
    assert_names(error, "--vae", "ema, mse, none")
    assert_names(pytest.raises(UsageError, latent_space, "none", allow_pixels=False).value, "ema, mse")
    # a record: its table entry, else a folder that need not exist here, else SD-VAE's geometry
    assert isinstance(recorded_latent_space("/gone/vae"), AutoencoderKLSpace)
    assert isinstance(recorded_latent_space(None), AutoencoderKLSpace)
    assert isinstance(recorded_latent_space("none"), PixelSpace)
    config = dict(input_size=4, in_channels=4, num_classes=2, depth=1, hidden_size=32, patch_size=2, num_heads=2)
    assert checkpoint_info(config, {"vae": "/gone/vae"})["image_size"] == 32
    assert checkpoint_info(dict(config, in_channels=3), {"vae": "none"})["image_size"] == 4


#################################################################################
#                     Normalisation                                             #
#################################################################################

def test_normalise_denormalise_round_trip():
    raw = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    sd = AutoencoderKLSpace("ema")
    assert torch.equal(sd.normalise(raw), raw * SD_VAE_SCALE)  # the constant, exactly as before
    assert torch.equal(sd.denormalise(raw), raw / SD_VAE_SCALE)
    torch.testing.assert_close(sd.denormalise(sd.normalise(raw)), raw)
    per_channel = Normalisation(scale=(0.5, 1.0, 2.0, 4.0), shift=(0.1, 0.0, -0.3, 2.0))
    latents = per_channel.apply(raw)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0]).view(1, 4, 1, 1)  # (1, C, 1, 1)
    shift = torch.tensor([0.1, 0.0, -0.3, 2.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(latents, (raw - shift) * scale)
    torch.testing.assert_close(per_channel.invert(latents), raw)


#################################################################################
#                     Equality with the formulas used before                    #
#################################################################################

def test_autoencoder_space_equals_the_previous_formulas(sd_space):
    vae, x = sd_space.network, images(2, 32)
    with torch.no_grad():
        torch.manual_seed(3)
        expected = vae.encode(x).latent_dist.sample().float().mul_(0.18215)
        torch.manual_seed(3)
        assert torch.equal(sd_space.encode(x, sample=True), expected)
        assert torch.equal(sd_space.encode(x, sample=False), vae.encode(x).latent_dist.mean * 0.18215)
        posterior = vae.encode(x).latent_dist
        mean, std = sd_space.posterior(x)
        assert torch.equal(mean, posterior.mean) and torch.equal(std, posterior.std)
        torch.manual_seed(4)
        expected = (mean + std * torch.randn(mean.shape, dtype=mean.dtype)).mul_(0.18215)
        torch.manual_seed(4)
        assert torch.equal(sd_space.sample_posterior(mean, std), expected)
        z = torch.randn(2, 4, 4, 4)
        assert torch.equal(sd_space.decode(z), vae.decode(z / 0.18215).sample.float())
        # a bare AutoencoderKL (what benchmarks and tests hold) is the same space
        assert torch.equal(as_latent_space(vae).decode(z), sd_space.decode(z))


def test_the_shape_and_size_helpers_of_sit_latents():
    """What sit.training and the device scripts import beside the LatentSpace classes."""
    from sit.latents import PIXEL_SPACE, PixelSpace, image_size_for, latent_shape, latent_space, uint8_hwc

    assert (image_size_for(4, 4), image_size_for(12, 3)) == (32, 12)  # SD-VAE latents, pixels
    pixels = latent_space(PIXEL_SPACE)  # what --vae none resolves to
    assert isinstance(pixels, PixelSpace) and (pixels.channels, pixels.downsampling) == (3, 1)
    assert latent_shape({"in_channels": 6, "input_size": 5}) == (6, 5, 5)
    images = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]).reshape(1, 3, 1, 2)  # (N, 3, H, W)
    # 127.5 x + 128, clamped to [0, 255], truncated to uint8 as the original; channels move last
    assert uint8_hwc(images).tolist() == [[[[0, 128, 255], [0, 191, 255]]]]


#################################################################################
#                     Adding a latent space (docs/ARCHITECTURE.md)              #
#################################################################################

class RandomPatchMap(LatentSpace):
    """A toy latent space: each d x d patch of an image (3 d^2 values) through a fixed random map (seeded)
    to `channels`, a constant posterior std, decoded by the map's pseudo-inverse; per-channel
    normalisation. Subclasses set channels, downsampling, normalisation, seed and std."""
    seed, std = 0, 0.0
    decoded: list = []  # the shapes of the latents it decoded, for the tests

    def __init__(self, name: str) -> None:
        super().__init__(name)
        generator = torch.Generator().manual_seed(self.seed)
        values = 3 * self.downsampling ** 2
        self.matrix = torch.randn(self.channels, values, generator=generator) / self.downsampling  # (C, 3 d^2)
        self.inverse = torch.linalg.pinv(self.matrix)                                              # (3 d^2, C)

    def posterior(self, images: torch.Tensor, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
        patches = F.pixel_unshuffle(images, self.downsampling)                 # (N, 3 d^2, H/d, W/d)
        mean = torch.einsum("cp,nphw->nchw", self.matrix.to(images), patches)  # (N, C, H/d, W/d)
        return mean, torch.full_like(mean, self.std)

    def decode(self, latents: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        type(self).decoded.append(tuple(latents.shape))
        raw = self.denormalise(latents)
        patches = torch.einsum("pc,nchw->nphw", self.inverse.to(raw), raw)    # (N, 3 d^2, L, L)
        return F.pixel_shuffle(patches, self.downsampling).clamp(-1, 1)        # (N, 3, dL, dL)


class RandomLinearSpace(RandomPatchMap):
    """SD-VAE's geometry (4 channels, downsampling 8) with per-channel normalisation."""
    channels = 4
    downsampling = 8
    normalisation = Normalisation(scale=(0.5, 1.0, 2.0, 4.0), shift=(0.1, 0.0, -0.1, 0.2))
    decoded: list = []


class HalfResolution(LatentSpace):
    """A toy latent space of another geometry: each 2x2 patch as 12 channels (downsampling 2), exactly invertible."""
    channels = 12
    downsampling = 2

    def posterior(self, images: torch.Tensor, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
        mean = F.pixel_unshuffle(images, 2)  # (N, 12, H/2, W/2)
        return mean, torch.zeros_like(mean)

    def decode(self, latents: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        return F.pixel_shuffle(self.denormalise(latents), 2)  # (N, 3, 2L, 2L)


def test_a_latent_space_of_another_geometry_trains_through_the_library(monkeypatch):
    """12 channels at half resolution: the training step learns what it encodes (train.py's model
    settings still build 4-channel / 8x models: sit.training.settings has not switched yet)."""
    monkeypatch.setitem(LATENT_SPACES, "half", HalfResolution)
    space = load_latent_space("half", CPU)
    x = images(2, 16)
    assert torch.equal(space.decode(space.encode(x)), x)
    model = SiT(input_size=space.input_size(16), in_channels=space.channels, patch_size=2, num_classes=2, **TINY_CONFIG)
    step = TrainStep.create(model, transport=create_transport(), device=CPU, lr=1e-4, vae=space)
    assert torch.equal(training_latents(step, [x]), F.pixel_unshuffle(x, 2))
    assert torch.isfinite(train_step(step, [x], torch.tensor([0, 1])).loss)


def test_add_a_latent_space_train_and_sample_with_it(tmp_path, monkeypatch):
    """The recipe: a LatentSpace subclass and its table entry, both from this file; train.py --vae
    linear8 encodes with it, previews and its checkpoint record it, sample.py --vae linear8 decodes with it."""
    from sit.training.signals import StopSignal

    monkeypatch.setitem(LATENT_SPACES, "linear8", RandomLinearSpace)
    monkeypatch.setattr(StopSignal, "install", lambda self: None)
    monkeypatch.setattr(RandomLinearSpace, "decoded", [])
    space = latent_space("linear8")
    x = images(2, 32)
    with torch.no_grad():
        torch.manual_seed(0)
        model = SiT(input_size=4, in_channels=4, patch_size=2, num_classes=2, **TINY_CONFIG)
        step = TrainStep.create(model, transport=create_transport(), device=CPU, lr=1e-4, vae=space)
        mean, _ = space.posterior(x)
        assert torch.equal(training_latents(step, [x]), space.normalise(mean))  # std 0: the mean itself

    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=32)
    train.main(["--data-path", data, "--results-dir", str(tmp_path / "results"), "--vae", "linear8",
                "--model", "SiT-S/2", "--model-config", json.dumps(TINY_CONFIG), "--image-size", "32",
                "--num-classes", "2", "--global-batch-size", "2", "--max-steps", "2", "--num-workers", "0",
                "--log-every", "1", "--sample-every", "2", "--ckpt-every", "100"])
    (experiment,) = os.listdir(tmp_path / "results")
    folder = tmp_path / "results" / experiment
    ckpt = str(folder / "checkpoints" / "0000002.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert settings_of(checkpoint)["vae"] == "linear8"
    assert checkpoint_info(checkpoint["model_config"], settings_of(checkpoint))["image_size"] == 32
    assert os.listdir(folder / "samples") == ["0000002.png"] and [shape[0] for shape in RandomLinearSpace.decoded] == [16]  # the preview

    sample.main(["ODE", "--ckpt", ckpt, "--vae", "linear8", "--class-labels", "0,1", "--num-sampling-steps", "2",
                 "--sampling-method", "euler", "--output", str(tmp_path / "grid.png")])
    assert [shape[0] for shape in RandomLinearSpace.decoded] == [16, 2]
    assert Image.open(tmp_path / "grid.png").size == (2 * 32 + 3 * 2, 32 + 2 * 2)


class QuarterResolution(RandomPatchMap):
    """Another geometry than SD-VAE's: 6 channels at a quarter of the resolution, a posterior std of 0.05."""
    channels = 6
    downsampling = 4
    normalisation = Normalisation(scale=(0.5, 1.0, 2.0, 1.0, 0.5, 1.5), shift=(0.1, 0.0, -0.1, 0.2, 0.0, 0.3))
    seed, std = 1, 0.05
    decoded: list = []


def test_a_latent_space_of_another_geometry_end_to_end(tmp_path, monkeypatch):
    """6 channels at a quarter of the resolution, registered from this file: extract_features.py --vae
    toy4 caches its raw posteriors, train.py --feature-path trains a 6-channel model on them (and
    previews with it), and sample.py and sample_ddp.py decode with it, named by the checkpoint alone."""
    import extract_features
    import sample_ddp
    from sit.data.images import TrainImageFolder
    from sit.record import read_record, record_path
    from sit.training.signals import StopSignal

    monkeypatch.setitem(LATENT_SPACES, "toy4", QuarterResolution)
    monkeypatch.setattr(StopSignal, "install", lambda self: None)
    monkeypatch.setattr(QuarterResolution, "decoded", [])
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=16)
    features = str(tmp_path / "features")
    extract = ["--data-path", data, "--features-path", features, "--vae", "toy4", "--batch-size", "2",
               "--num-workers", "0", "--float32"]
    error = pytest.raises(UsageError, extract_features.main, [*extract, "--image-size", "18"]).value
    assert_names(error, "--image-size", "multiple of 4", "18")  # the space's downsampling, not SD-VAE's 8
    extract_features.main([*extract, "--image-size", "20"])  # a multiple of 4 only
    with open(os.path.join(features, "meta.json")) as file:
        meta = json.load(file)
    assert (meta["vae"], meta["latent_shape"], meta["complete"]) == ("toy4", [6, 5, 5], True)
    extract_features.main([*extract, "--features-path", str(tmp_path / "features16"), "--image-size", "16"])
    features = str(tmp_path / "features16")
    mean, std = (np.load(os.path.join(features, f"{name}.npy")) for name in ("mean", "std"))
    assert mean.shape == std.shape == (4, 2, 6, 4, 4) and (std == np.float32(0.05)).all()
    image, _ = TrainImageFolder(data, 16, random_flip=False)[0]
    raw, _ = latent_space("toy4").posterior(torch.stack([image, image.flip(dims=[2])]))  # (2, 6, 4, 4)
    torch.testing.assert_close(torch.from_numpy(mean[0]), raw)  # the raw posterior, not normalised

    train.main(["--feature-path", features, "--results-dir", str(tmp_path / "results"), "--model", "SiT-S/2",
                "--model-config", json.dumps(TINY_CONFIG), "--image-size", "16", "--num-classes", "2",
                "--global-batch-size", "2", "--max-steps", "2", "--num-workers", "0", "--log-every", "1",
                "--sample-every", "2", "--ckpt-every", "100"])
    (experiment,) = os.listdir(tmp_path / "results")
    ckpt = str(tmp_path / "results" / experiment / "checkpoints" / "0000002.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    config = checkpoint["model_config"]
    assert (settings_of(checkpoint)["vae"], config["in_channels"], config["input_size"]) == ("toy4", 6, 4)
    assert checkpoint_info(config, settings_of(checkpoint))["image_size"] == 16
    assert QuarterResolution.decoded == [(16, 6, 4, 4)]  # the preview grid

    grid = str(tmp_path / "grid.png")
    sample.main(["ODE", "--ckpt", ckpt, "--class-labels", "0,1", "--num-sampling-steps", "2",
                 "--sampling-method", "euler", "--output", grid])
    assert QuarterResolution.decoded[1:] == [(2, 6, 4, 4)]
    assert Image.open(grid).size == (2 * 16 + 3 * 2, 16 + 2 * 2)

    samples = tmp_path / "samples"
    sample_ddp.main(["ODE", "--ckpt", ckpt, "--num-sampling-steps", "2", "--sampling-method", "euler",
                     "--num-fid-samples", "3", "--per-proc-batch-size", "2", "--sample-dir", str(samples)])
    assert QuarterResolution.decoded[2:] == [(2, 6, 4, 4), (1, 6, 4, 4)]
    (folder,) = [entry for entry in os.listdir(samples) if os.path.isdir(samples / entry)]
    assert "-16px-vae-toy4-" in folder
    pngs = sorted(name for name in os.listdir(samples / folder) if name.endswith(".png"))
    assert len(pngs) == 3 and all(Image.open(samples / folder / png).size == (16, 16) for png in pngs)
    assert np.load(samples / f"{folder}.npz")["arr_0"].shape == (3, 16, 16, 3)
    record = read_record(record_path(str(samples / f"{folder}.npz")))
    assert (record.vae, record.vae_sha256, record.image_size, record.image_shape) == ("toy4", None, 16, (16, 16, 3))
