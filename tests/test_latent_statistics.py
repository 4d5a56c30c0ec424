"""Per-channel latent statistics (sit.latents.statistics): measured by extract_features.py exactly (over
blocks, ranks and interrupted runs), normalised with in training (--latent-norm per-channel), carried by
the checkpoint and de-normalised with by sampling without a flag; and the one-line refusals."""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import extract_features
import sample
import train
from conftest import REPO, assert_names
from models import SiT
from sit.checkpoint import load_model
from sit.data.features import block_marker, read_meta, write_meta
from sit.errors import UsageError
from sit.latents import latent_space
from sit.latents.statistics import ChannelMoments, LatentStatistics
from sit.sampling.loading import load_decoder
from sit.training.decoder import run_latent_statistics
from sit.training.step import TrainStep, training_latents
from transport import create_transport

CPU = torch.device("cpu")
TINY_CONFIG = {"depth": 1, "hidden_size": 32, "num_heads": 2}
AXES = (0, 1, 3, 4)  # (N, 2, C, h, w): all but the channel


def numpy_statistics(folder: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The reference: the stored arrays in float64, per channel: E[mu], sqrt(Var[mu] + E[sigma^2]), values."""
    mean = np.load(os.path.join(folder, "mean.npy")).astype(np.float64)
    std = np.load(os.path.join(folder, "std.npy")).astype(np.float64)
    count = mean.size // mean.shape[2]
    return mean.mean(axis=AXES), np.sqrt(mean.var(axis=AXES) + np.square(std).mean(axis=AXES)), count


def assert_measured_exactly(folder: str) -> dict:
    stored = read_meta(folder)["latent_statistics"]
    mean, std, count = numpy_statistics(folder)
    np.testing.assert_allclose(stored["mean"], mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stored["std"], std, rtol=1e-12, atol=0)
    assert stored["count"] == count
    return stored


def extract_args(image_folder: str, tiny_vae: str, out: str, block_size: int = 3) -> list:
    return ["--data-path", image_folder, "--features-path", out, "--image-size", "32", "--vae", tiny_vae,
            "--batch-size", "3", "--block-size", str(block_size), "--num-workers", "0"]  # float16, as by default


@pytest.fixture(scope="module")
def features(tmp_path_factory, image_folder, tiny_vae) -> str:
    out = str(tmp_path_factory.mktemp("stats") / "feats")
    extract_features.main(extract_args(image_folder, tiny_vae, out))
    return out


def test_statistics_equal_numpy_on_the_stored_arrays(features):
    stored = assert_measured_exactly(features)
    assert stored["count"] == 8 * 2 * 4 * 4  # 8 images and their flips, 4x4 positions
    assert np.load(os.path.join(features, "mean.npy")).dtype == np.float16  # measured on the values as stored


def test_moments_add_over_blocks_and_ranks():
    rng = np.random.default_rng(0)
    mean = rng.normal(loc=[3.0, -1.0, 0.5], size=(10, 2, 4, 4, 3)).transpose(0, 1, 4, 2, 3)  # (10, 2, 3, 4, 4)
    std = rng.uniform(0.1, 2.0, size=mean.shape)
    ranks = []
    for part in (slice(0, 3), slice(3, 7), slice(7, 10)):  # three "ranks", the second in two blocks
        moments = ChannelMoments(3)
        for block in ((part,) if part.start != 3 else (slice(3, 5), slice(5, 7))):
            moments.add(mean[block], std[block])
        ranks.append(moments.flat())
    total = ChannelMoments.from_flat(np.sum(ranks, axis=0).tolist(), 3).statistics()
    np.testing.assert_allclose(total.mean, mean.mean(axis=AXES), rtol=1e-13)
    np.testing.assert_allclose(total.std, np.sqrt(mean.var(axis=AXES) + (std ** 2).mean(axis=AXES)), rtol=1e-13)
    assert total.count == 10 * 2 * 16


def test_an_interrupted_extraction_still_measures_every_block(features, image_folder, tiny_vae, tmp_path):
    """A run killed after its first block left meta.json incomplete and without statistics; the same
    command encodes the rest and measures the whole folder, the blocks of the killed run included."""
    folder = str(tmp_path / "feats")
    shutil.copytree(features, folder)
    first = read_meta(folder)["latent_statistics"]
    for start in (3, 6):
        os.remove(block_marker(folder, start))
    damaged = np.load(os.path.join(folder, "mean.npy"), mmap_mode="r+")
    damaged[3:] = 0
    damaged.flush()
    write_meta(folder, {key: value for key, value in read_meta(folder).items() if key != "latent_statistics"}
               | {"complete": False})
    extract_features.main(extract_args(image_folder, tiny_vae, folder))
    stored = assert_measured_exactly(folder)
    np.testing.assert_allclose(stored["mean"], first["mean"], rtol=1e-12)  # the same latents re-encoded
    np.testing.assert_allclose(stored["std"], first["std"], rtol=1e-12)


@pytest.mark.slow
def test_two_processes_measure_the_whole_folder(features, image_folder, tiny_vae, tmp_path):
    out = str(tmp_path / "feats2")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29614",
               "extract_features.py", *extract_args(image_folder, tiny_vae, out, block_size=2)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    stored = assert_measured_exactly(out)  # each rank summed its own blocks; the sums were added over both
    np.testing.assert_allclose(stored["mean"], read_meta(features)["latent_statistics"]["mean"], rtol=1e-3, atol=1e-4)


def test_training_normalises_by_the_statistics_by_hand(features):
    statistics = LatentStatistics.from_dict(read_meta(features)["latent_statistics"], "test", "")
    space = latent_space("ema").use_normalisation(statistics.normalisation())  # not loaded: features need no network
    torch.manual_seed(0)
    model = SiT(input_size=4, in_channels=4, patch_size=2, num_classes=2, **TINY_CONFIG)
    step = TrainStep.create(model, transport=create_transport(), device=CPU, lr=1e-4, vae=space, from_features=True)
    mean, std = torch.randn(2, 4, 4, 4) + 3, torch.rand(2, 4, 4, 4)
    torch.manual_seed(1)
    latents = training_latents(step, [mean, std])
    torch.manual_seed(1)
    raw = mean + std * torch.randn(2, 4, 4, 4)
    by_hand = (raw - torch.tensor(statistics.mean).view(1, 4, 1, 1)) / torch.tensor(statistics.std).view(1, 4, 1, 1)
    torch.testing.assert_close(latents, by_hand, rtol=1e-5, atol=1e-6)


def train_tiny(features: str, results: str, *more: str) -> str:
    train.main(["--feature-path", features, "--results-dir", results, "--model", "SiT-S/2", "--model-config",
                json.dumps(TINY_CONFIG), "--image-size", "32", "--num-classes", "2", "--global-batch-size", "2",
                "--max-steps", "2", "--num-workers", "0", "--log-every", "1", "--ckpt-every", "100", *more])
    (experiment,) = os.listdir(results)
    return os.path.join(results, experiment, "checkpoints", "0000002.pt")


@pytest.mark.slow
def test_checkpoint_carries_the_statistics_and_sampling_denormalises(features, tiny_vae, tmp_path, monkeypatch):
    from diffusers.models import AutoencoderKL

    from sit.training.signals import StopSignal

    monkeypatch.setattr(StopSignal, "install", lambda self: None)
    ckpt = train_tiny(features, str(tmp_path / "results"), "--latent-norm", "per-channel", "--sample-every", "2")
    assert os.listdir(os.path.dirname(os.path.dirname(ckpt)) + "/samples") == ["0000002.png"]  # a preview decoded
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    stored = read_meta(features)["latent_statistics"]
    assert checkpoint["latent_statistics"] == stored and checkpoint["args"]["latent_norm"] == "per-channel"
    assert checkpoint["args"]["vae"] == tiny_vae  # the latent space the statistics belong to

    _, info = load_model(ckpt)
    statistics = info["latent_statistics"]
    assert statistics == LatentStatistics.from_dict(stored, "meta.json", "")
    space = load_decoder(info["vae"], CPU, statistics)
    latents = torch.randn(2, 4, 4, 4)
    network = AutoencoderKL.from_pretrained(tiny_vae).eval()
    with torch.no_grad():
        by_hand = network.decode(latents * torch.tensor(stored["std"]).view(1, 4, 1, 1)
                                 + torch.tensor(stored["mean"]).view(1, 4, 1, 1)).sample
        torch.testing.assert_close(space.decode(latents), by_hand, rtol=1e-5, atol=1e-5)

    decoders = []
    monkeypatch.setattr(sample, "load_decoder", lambda *args: decoders.append(load_decoder(*args)) or decoders[-1])
    command = ["ODE", "--ckpt", ckpt, "--class-labels", "0,1", "--num-sampling-steps", "2", "--sampling-method",
               "euler", "--output", str(tmp_path / "grid.png")]
    sample.main(command)  # no latent flag: the checkpoint names the space and its statistics
    assert decoders[0].name == tiny_vae and decoders[0].measured == statistics.normalisation()
    assert_names(pytest.raises(UsageError, sample.main, [*command, "--vae", "mse"]).value, "--vae mse", "per-channel")


@pytest.mark.slow
def test_constant_checkpoints_hold_no_statistics(features, tmp_path, monkeypatch):
    from sit.training.signals import StopSignal

    monkeypatch.setattr(StopSignal, "install", lambda self: None)
    ckpt = train_tiny(features, str(tmp_path / "results"))
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert "latent_statistics" not in checkpoint and checkpoint["args"]["latent_norm"] == "constant"
    assert load_model(ckpt)[1]["latent_statistics"] is None
    for broken in (None, {"mean": [0.0] * 4, "std": [float("nan")] + [1.0] * 3, "count": 1}):
        checkpoint["args"]["latent_norm"] = "per-channel"  # a per-channel checkpoint without usable statistics
        checkpoint["latent_statistics"] = broken
        torch.save(checkpoint, tmp_path / "broken.pt")
        error = pytest.raises(UsageError, load_model, str(tmp_path / "broken.pt")).value
        assert_names(error, "broken.pt", "latent statistics")


def plan(argv: list):
    from sit.distributed import launched_world_size
    from sit.training.launch import plan_training

    args, explicit = train.parse_args(argv)
    return plan_training(vars(args), explicit, launched_world_size())


def tiny_flags(tmp_path, *more: str) -> list:
    return ["--results-dir", str(tmp_path / "results"), "--model", "SiT-S/2", "--model-config", json.dumps(TINY_CONFIG),
            "--image-size", "32", "--num-classes", "2", "--global-batch-size", "2", "--num-workers", "0", *more]


def test_refusals_are_one_line(features, image_folder, tmp_path):
    per_channel = ("--latent-norm", "per-channel")
    assert plan(["--feature-path", features, *tiny_flags(tmp_path, *per_channel)]).latent_statistics is not None
    assert plan(["--feature-path", features, *tiny_flags(tmp_path)]).latent_statistics is None
    error = pytest.raises(UsageError, plan, ["--data-path", image_folder, *tiny_flags(tmp_path, *per_channel)]).value
    assert_names(error, "--latent-norm per-channel", "--feature-path")
    error = pytest.raises(UsageError, plan, ["--data-path", image_folder, *tiny_flags(tmp_path, "--vae", "none",
                                                                                    *per_channel)]).value
    assert_names(error, "--latent-norm per-channel", "--vae none")
    error = pytest.raises(UsageError, plan, ["--feature-path", features, *tiny_flags(tmp_path, "--vae", "mse",
                                                                                    *per_channel)]).value
    assert_names(error, "--vae mse", "statistics")  # the features' statistics are of another latent space

    folder = str(tmp_path / "feats")
    shutil.copytree(features, folder)
    meta = read_meta(folder)
    for statistics, words in ((None, ("holds no latent statistics", "extract_features.py")),
                              (dict(meta["latent_statistics"], std=[1.0, float("inf"), 1.0, 1.0]), ("not a finite",)),
                              (dict(meta["latent_statistics"], mean=[0.0]), ("1 means",))):
        write_meta(folder, {key: value for key, value in meta.items() if key != "latent_statistics"}
                   | ({} if statistics is None else {"latent_statistics": statistics}))
        error = pytest.raises(UsageError, plan, ["--feature-path", folder, *tiny_flags(tmp_path, *per_channel)]).value
        assert_names(error, f"--feature-path {folder}", *words)


def test_a_resume_keeps_the_normalisation_it_learned(features):
    model = SimpleNamespace(latent_norm="per-channel", vae="ema")
    meta = read_meta(features)
    error = pytest.raises(UsageError, run_latent_statistics, model, features, meta, {"args": {}}, {}).value
    assert_names(error, "--latent-norm per-channel", "constant")  # an older checkpoint learned constant-scaled latents
    held = {"mean": [1.0] * 4, "std": [2.0] * 4, "count": 5}
    kept = run_latent_statistics(model, features, meta, {"latent_statistics": held},
                                 {"latent_norm": "per-channel", "vae": "ema"})
    assert kept == LatentStatistics((1.0,) * 4, (2.0,) * 4, 5)  # the checkpoint's, not the features'
