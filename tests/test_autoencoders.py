"""The autoencoders behind --vae, offline, with random weights of their real shapes: any diffusers
AutoencoderKL folder (its own channels, downsampling, scaling and shift factors), VA-VAE f16d32 from its
LDM-format checkpoint (the mapping onto diffusers' AutoencoderKL checked key by key and against an LDM
reference forward), REPA-E's E2E-VAEs (hub folders), and the round trip train.py -> sample.py /
sample_ddp.py recovering the space from the checkpoint alone; bad input in one line."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import sample
import train
from conftest import assert_names, make_image_folder
from sit.checkpoint import settings_of
from sit.errors import UsageError
from sit.hub import HubUnavailable
from sit.latents import LATENT_SPACES, Normalisation, latent_space, load_latent_space, recorded_latent_space
from sit.latents.repae import E2EVAE8, E2EVAE16
from sit.latents.vavae import (VAVAE_CHANNELS, VAVAE_FILE, VAVAE_LAYERS, VAVAE_REPO, VAVAE_WIDTHS, VAVAESpace,
                               diffusers_state_dict, vavae_network)

CPU = torch.device("cpu")
TINY_CONFIG = {"depth": 1, "hidden_size": 32, "num_heads": 2}
NARROW = (32, 32, 64, 64, 96)  # VA-VAE's 5 levels, narrow (LDM's 32 GroupNorm groups divide each width)


def images(count: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(count, 3, size, size) in [-1, 1]."""
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


#################################################################################
#          An LDM (taming) AutoencoderKL, written from its architecture         #
#################################################################################

def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class LDMResnet(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, plus the input (a 1x1 nin_shortcut when widths differ)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class LDMAttention(nn.Module):
    """One-head self-attention over the pixels with 1x1 convolutions q, k, v, proj_out, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        y = self.norm(x)
        q = self.q(y).flatten(2).transpose(1, 2)                  # (N, HW, C)
        k, v = self.k(y).flatten(2), self.v(y).flatten(2)         # (N, C, HW) each
        weights = torch.softmax(q @ k / c ** 0.5, dim=-1)         # (N, HW queries, HW keys)
        out = (v @ weights.transpose(1, 2)).view(n, c, height, width)  # (N, C, HW queries) -> (N, C, H, W)
        return x + self.proj_out(out)


def ldm_level(cin: int, width: int, blocks: int, attention: bool, resample: str = "") -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(LDMResnet(cin if index == 0 else width, width) for index in range(blocks))
    level.attn = nn.ModuleList(LDMAttention(width) for _ in range(blocks if attention else 0))
    if resample:
        setattr(level, resample, nn.Module())
        getattr(level, resample).conv = nn.Conv2d(width, width, 3, stride=2 if resample == "downsample" else 1,
                                                  padding=0 if resample == "downsample" else 1)
    return level


def ldm_middle(width: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = LDMResnet(width, width), LDMAttention(width), LDMResnet(width, width)
    return mid


def ldm_autoencoder(widths: tuple = VAVAE_WIDTHS, z: int = VAVAE_CHANNELS, blocks: int = VAVAE_LAYERS) -> nn.Module:
    """LDM's AutoencoderKL as VA-VAE configures it: attention at the lowest level (resolution 16 of 256)."""
    last = len(widths) - 1
    model, encoder, decoder = nn.Module(), nn.Module(), nn.Module()
    encoder.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
    encoder.down = nn.ModuleList(ldm_level(widths[max(i - 1, 0)], width, blocks, i == last,
                                           "downsample" if i != last else "") for i, width in enumerate(widths))
    encoder.mid, encoder.norm_out = ldm_middle(widths[-1]), group_norm(widths[-1])
    encoder.conv_out = nn.Conv2d(widths[-1], 2 * z, 3, padding=1)
    decoder.conv_in, decoder.mid = nn.Conv2d(z, widths[-1], 3, padding=1), ldm_middle(widths[-1])
    decoder.up = nn.ModuleList(ldm_level(widths[min(i + 1, last)], width, blocks + 1, i == last,
                                         "upsample" if i != 0 else "") for i, width in enumerate(widths))
    decoder.norm_out, decoder.conv_out = group_norm(widths[0]), nn.Conv2d(widths[0], 3, 3, padding=1)
    model.encoder, model.decoder = encoder, decoder
    model.quant_conv, model.post_quant_conv = nn.Conv2d(2 * z, 2 * z, 1), nn.Conv2d(z, z, 1)
    return model


def ldm_run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for index, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[index](h)
    return h


def ldm_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def ldm_encode(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> the posterior's (mean, std): the log variance clamped to [-30, 20]."""
    encoder, h = model.encoder, model.encoder.conv_in(x)
    for level in encoder.down:
        h = ldm_run_level(level, h)
        if hasattr(level, "downsample"):
            h = level.downsample.conv(F.pad(h, (0, 1, 0, 1)))  # asymmetric padding, stride 2
    h = encoder.conv_out(F.silu(encoder.norm_out(ldm_mid(encoder.mid, h))))
    mean, logvar = model.quant_conv(h).chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def ldm_decode(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    decoder = model.decoder
    h = ldm_mid(decoder.mid, decoder.conv_in(model.post_quant_conv(z)))
    for index in reversed(range(len(decoder.up))):  # from the lowest resolution up
        level = decoder.up[index]
        h = ldm_run_level(level, h)
        if hasattr(level, "upsample"):
            h = level.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return decoder.conv_out(F.silu(decoder.norm_out(h)))


def random_ldm(widths: tuple = NARROW, seed: int = 0) -> nn.Module:
    """A random LDM autoencoder with weights large enough that every path matters."""
    torch.manual_seed(seed)
    model = ldm_autoencoder(widths).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def write_vavae(path: str, widths: tuple = NARROW, seed: int = 0) -> str:
    """A VA-VAE checkpoint as released: LDM keys under "state_dict", with training-only keys beside them."""
    state = dict(random_ldm(widths, seed).state_dict())
    state["loss.discriminator.main.0.weight"] = torch.ones(2, 3)
    state["linear_proj.weight"] = torch.ones(4, 32)
    torch.save({"state_dict": state, "global_step": 7}, path)
    return path


#################################################################################
#                     VA-VAE: the LDM -> diffusers mapping                     #
#################################################################################

def test_vavae_mapping_fills_every_diffusers_key_once_at_the_real_shape():
    """The real VA-VAE shape (128..512 wide, 5 levels, 32 channels), without memory (meta tensors): the
    LDM key set maps one to one onto diffusers' AutoencoderKL, every shape equal."""
    with torch.device("meta"):
        ldm = ldm_autoencoder().state_dict()
        expected = vavae_network().state_dict()
    mapped = diffusers_state_dict(ldm, len(VAVAE_WIDTHS))
    assert len(ldm) == len(mapped) == len(expected) == 342
    assert set(mapped) == set(expected)
    assert {key: tuple(tensor.shape) for key, tensor in mapped.items()} == \
           {key: tuple(tensor.shape) for key, tensor in expected.items()}
    assert ldm["decoder.up.4.attn.2.q.weight"].shape == (512, 512, 1, 1)  # the lowest level attends
    assert expected["decoder.up_blocks.0.attentions.2.to_q.weight"].shape == (512, 512)
    params = sum(tensor.numel() for tensor in expected.values())
    assert 60e6 < params < 90e6  # VA-VAE's size (about 70 M)


def test_vavae_mapping_moves_each_tensor_and_the_forward_equals_ldm():
    """Every diffusers key receives exactly one LDM tensor (the same values; attention's 1x1 convolutions
    as matrices), and the diffusers network computes what the LDM network does: posterior and decoding."""
    ldm = random_ldm()
    state = ldm.state_dict()
    mapped = diffusers_state_dict(state, len(NARROW))
    sources = {}
    for key, tensor in state.items():
        matches = [name for name, value in mapped.items()
                   if value.data_ptr() == tensor.data_ptr() and value.numel() == tensor.numel()]
        assert len(matches) == 1, key
        assert torch.equal(mapped[matches[0]].reshape(tensor.shape), tensor)
        sources[matches[0]] = key
    assert len(sources) == len(mapped) == len(vavae_network(NARROW).state_dict())
    assert sources["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"] == "decoder.up.3.block.0.nin_shortcut.weight"
    assert sources["decoder.up_blocks.3.upsamplers.0.conv.bias"] == "decoder.up.1.upsample.conv.bias"
    assert sources["encoder.mid_block.attentions.0.to_out.0.weight"] == "encoder.mid.attn_1.proj_out.weight"

    network = vavae_network(NARROW)
    network.load_state_dict(mapped, strict=True)
    x = images(2, 32)
    with torch.no_grad():
        mean, std = ldm_encode(ldm, x)
        posterior = network.encode(x).latent_dist
        assert mean.shape == (2, 32, 2, 2)
        torch.testing.assert_close(posterior.mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(posterior.std, std, rtol=1e-4, atol=1e-5)
        z = torch.randn(2, 32, 2, 2, generator=torch.Generator().manual_seed(1))
        decoded = ldm_decode(ldm, z)
        assert decoded.shape == (2, 3, 32, 32) and decoded.std() > 0.1
        torch.testing.assert_close(network.decode(z).sample, decoded, rtol=1e-4, atol=1e-5)


def test_vavae_space_loads_an_ldm_file(tmp_path):
    """--vae file.pt: VA-VAE's geometry before loading (recorded spaces need no file), raw latents (scale 1),
    loaded with weights_only=True, encoding and decoding as the LDM network does."""
    path = write_vavae(str(tmp_path / VAVAE_FILE))
    recorded = recorded_latent_space("/gone/" + VAVAE_FILE)
    assert isinstance(recorded, VAVAESpace)
    assert (recorded.channels, recorded.downsampling, recorded.normalisation) == (32, 16, Normalisation(scale=1.0))
    space = load_latent_space(path, CPU)
    assert space.name == path and isinstance(space, VAVAESpace)
    x = images(2, 32)
    ldm = random_ldm()
    with torch.no_grad():
        mean, std = space.posterior(x)
        expected_mean, expected_std = ldm_encode(ldm, x)
        torch.testing.assert_close(mean, expected_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(std, expected_std, rtol=1e-4, atol=1e-5)
        assert torch.equal(space.encode(x, sample=False), mean)  # scale 1, no shift
        z = torch.randn(2, 32, 2, 2)
        torch.testing.assert_close(space.decode(z), ldm_decode(ldm, z), rtol=1e-4, atol=1e-5)
    assert space.input_size(256) == 16 and space.image_size(16) == 256


def test_vavae_hub_entry_fetches_its_file_with_a_bounded_failure(tmp_path, monkeypatch):
    import sit.latents.vavae as vavae

    path = write_vavae(str(tmp_path / VAVAE_FILE))
    asked = []
    monkeypatch.setattr(vavae, "hub_file", lambda repo, name: asked.append((repo, name)) or path)
    space = load_latent_space("vavae-f16d32", CPU)
    assert asked == [(VAVAE_REPO, VAVAE_FILE)] and space.network is not None

    def offline(repo, name):
        raise HubUnavailable(f"{repo}/{name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    monkeypatch.setattr(vavae, "hub_file", offline)
    error = pytest.raises(UsageError, load_latent_space, "vavae-f16d32", CPU).value
    assert_names(error, "vavae-f16d32", VAVAE_REPO, f"--vae /path/to/{VAVAE_FILE}")


def test_vavae_bad_files(tmp_path):
    """A missing file names itself and where to get it; a file of another shape says what it is not."""
    missing = str(tmp_path / "nowhere" / VAVAE_FILE)
    assert_names(pytest.raises(UsageError, latent_space, missing).value, "--vae", missing, "no such file", VAVAE_REPO)
    error = pytest.raises(UsageError, VAVAESpace(missing).load, CPU).value  # a recorded file not on this machine
    assert_names(error, missing, "does not exist", VAVAE_REPO)
    four_levels = write_vavae(str(tmp_path / "f8.pt"), widths=NARROW[:4])
    assert_names(pytest.raises(UsageError, load_latent_space, four_levels, CPU).value, four_levels,
                 "not an LDM-format VA-VAE f16d32", "4 encoder levels")
    state = random_ldm().state_dict()
    del state["decoder.up.4.attn.0.q.bias"]
    torch.save(state, tmp_path / "cut.pt")  # a bare state dict (no "state_dict") is read too
    assert_names(pytest.raises(UsageError, load_latent_space, str(tmp_path / "cut.pt"), CPU).value,
                 "cut.pt", "lacks 1 weights", "decoder.up_blocks.0.attentions.0.to_q.bias")
    torch.save({"state_dict": {"encoder.conv_in.weight": argparse.Namespace()}}, tmp_path / "pickled.pt")
    assert_names(pytest.raises(UsageError, load_latent_space, str(tmp_path / "pickled.pt"), CPU).value,
                 "pickled.pt", "cannot read")  # weights_only=True refuses pickled objects


#################################################################################
#            Any diffusers AutoencoderKL folder; REPA-E's E2E-VAEs              #
#################################################################################

def make_folder(path: str, channels: int, widths: tuple, **config) -> str:
    """A random diffusers AutoencoderKL saved to path: len(widths) levels, `channels` latent channels."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    levels = len(widths)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                  block_out_channels=widths, layers_per_block=1, latent_channels=channels, norm_num_groups=4,
                  **config).save_pretrained(path)
    return path


def test_a_diffusers_folder_brings_its_geometry_scale_and_shift(tmp_path):
    """An SD3/FLUX-style 16-channel folder with scaling and shift factors: latents = (raw - shift) * scale;
    the geometry is read from config.json before anything loads (train.py builds its model from it)."""
    folder = make_folder(str(tmp_path / "sd3"), 16, (8, 8, 8), scaling_factor=1.5305, shift_factor=0.0609)
    recorded = recorded_latent_space(folder)
    assert (recorded.channels, recorded.downsampling) == (16, 4) and recorded.network is None
    assert recorded.normalisation == Normalisation(scale=1.5305, shift=0.0609)
    space = load_latent_space(folder, CPU)
    x = images(2, 16)
    with torch.no_grad():
        raw = space.network.encode(x).latent_dist.mean
        assert raw.shape == (2, 16, 4, 4)
        assert torch.equal(space.encode(x, sample=False), (raw - 0.0609) * 1.5305)
        z = torch.randn(2, 16, 4, 4)
        assert torch.equal(space.decode(z), space.network.decode(z / 1.5305 + 0.0609).sample)
        assert space.decode(z).shape == (2, 3, 16, 16)
    # no shift_factor (SD-VAE's folders): exactly raw * scale, as before
    assert recorded_latent_space(make_folder(str(tmp_path / "sd"), 4, (8,) * 4)).normalisation == Normalisation(0.18215)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert_names(pytest.raises(UsageError, latent_space, str(tmp_path / "broken")).value, "config.json", "--vae")


def test_a_folder_changed_since_it_was_recorded(tmp_path):
    """The geometry read before loading and the network loaded must agree (a folder replaced meanwhile)."""
    folder = make_folder(str(tmp_path / "vae"), 16, (8, 8, 8))
    space = latent_space(folder)
    make_folder(folder, 4, (8, 8, 8))
    assert_names(pytest.raises(UsageError, space.load, CPU).value, folder, "4-channel", "16", "--vae")


@pytest.mark.parametrize("name, cls, repo, geometry", [
    ("e2e-vavae", E2EVAE16, "REPA-E/e2e-vavae-hf", (32, 16)), ("e2e-invae", E2EVAE16, "REPA-E/e2e-invae-hf", (32, 16)),
    ("e2e-sdvae", E2EVAE8, "REPA-E/e2e-sdvae-hf", (4, 8))])
def test_repae_e2e_vaes_load_their_hub_folders(name, cls, repo, geometry, tmp_path, monkeypatch):
    import sit.latents.autoencoder as autoencoder

    assert LATENT_SPACES[name] is cls
    space = latent_space(name)
    assert (space.channels, space.downsampling, space.normalisation) == (*geometry, Normalisation(scale=1.0))
    folder = make_folder(str(tmp_path / name), geometry[0], (8,) * (geometry[1].bit_length()), scaling_factor=0.5)
    asked = []
    monkeypatch.setattr(autoencoder, "hub_folder", lambda repo_id, files: asked.append(repo_id) or folder)
    space.load(CPU)
    assert asked == [repo]
    x = images(1, 32)
    with torch.no_grad():
        assert space.encode(x).shape == (1, geometry[0], 32 // geometry[1], 32 // geometry[1])
        assert torch.equal(space.encode(x, sample=False), space.network.encode(x).latent_dist.mean)  # raw latents

    def offline(repo_id, files):
        raise HubUnavailable(f"{repo_id}/config.json is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    monkeypatch.setattr(autoencoder, "hub_folder", offline)
    assert_names(pytest.raises(UsageError, latent_space(name).load, CPU).value, repo, "--vae /path/to")
    make_folder(folder, 8, (8, 8))  # a hub folder of another shape than the entry's
    monkeypatch.setattr(autoencoder, "hub_folder", lambda repo_id, files: folder)
    assert_names(pytest.raises(UsageError, latent_space(name).load, CPU).value, name, "8-channel")


#################################################################################
#          Round trip: train.py --vae X, then sampling with no flag             #
#################################################################################

def train_with(vae: str, tmp_path, image_size: int, patch_size: int = 2) -> str:
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=image_size)
    config = dict(TINY_CONFIG, patch_size=patch_size)
    train.main(["--data-path", data, "--results-dir", str(tmp_path / "results"), "--vae", vae,
                "--model", "SiT-S/2", "--model-config", json.dumps(config), "--image-size", str(image_size),
                "--num-classes", "2", "--global-batch-size", "2", "--max-steps", "1", "--num-workers", "0",
                "--log-every", "1", "--ckpt-every", "100"])
    (experiment,) = os.listdir(tmp_path / "results")
    return str(tmp_path / "results" / experiment / "checkpoints" / "0000001.pt")


def read_settings(ckpt: str) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return settings_of(torch.load(ckpt, map_location="cpu", weights_only=True))


def sample_grid(ckpt: str, output: str, *extra: str) -> None:
    sample.main(["ODE", "--ckpt", ckpt, "--class-labels", "0,1", "--num-sampling-steps", "2",
                 "--sampling-method", "euler", "--output", output, *extra])


@pytest.fixture
def no_signals(monkeypatch):
    from sit.training.signals import StopSignal

    monkeypatch.setattr(StopSignal, "install", lambda self: None)


def test_vavae_file_round_trip_through_features(tmp_path, no_signals, monkeypatch):
    """A VA-VAE-shaped random autoencoder (f16, 32 channels) as a relative .pt path: extract_features.py
    records its absolute path and the latents' per-channel statistics, train.py --feature-path --latent-norm
    per-channel builds SiT-XL/1's design (shrunk by --model-config) for 32 channels and its checkpoint carries
    both, sample.py and sample_ddp.py decode with it named by the checkpoint alone; the file gone: one line
    naming it."""
    import extract_features
    import sample_ddp

    path = write_vavae(str(tmp_path / VAVAE_FILE))
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=32)
    features = str(tmp_path / "features")
    extract_features.main(["--data-path", data, "--features-path", features, "--vae", VAVAE_FILE, "--image-size", "32",
                           "--batch-size", "2", "--num-workers", "0", "--float32"])
    with open(os.path.join(features, "meta.json")) as file:
        meta = json.load(file)
    assert (meta["vae"], meta["latent_shape"]) == (path, [32, 2, 2])
    mean = np.load(os.path.join(features, "mean.npy"))  # (images, flips, C, L, L): the raw posterior means
    x = torch.from_numpy(np.stack([np.asarray(Image.open(os.path.join(data, "class0", "0.png")))])).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected, _ = ldm_encode(random_ldm(), x.float() / 127.5 - 1)
    torch.testing.assert_close(torch.from_numpy(mean[0, :1]), expected, rtol=1e-4, atol=1e-4)

    statistics = meta["latent_statistics"]  # per channel, over the whole folder
    assert len(statistics["mean"]) == len(statistics["std"]) == 32

    # SiT-XL/1's design, shrunk: the patch-1 model for f16 latents, normalised by the measured statistics
    train.main(["--feature-path", features, "--results-dir", str(tmp_path / "results"), "--model", "SiT-XL/1",
                "--model-config", json.dumps(TINY_CONFIG), "--image-size", "32", "--latent-norm", "per-channel",
                "--num-classes", "2", "--global-batch-size", "2", "--max-steps", "1", "--num-workers", "0",
                "--log-every", "1", "--ckpt-every", "100"])
    (experiment,) = os.listdir(tmp_path / "results")
    ckpt = str(tmp_path / "results" / experiment / "checkpoints" / "0000001.pt")
    assert read_settings(ckpt)["vae"] == path
    with torch.serialization.safe_globals([argparse.Namespace]):
        stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    config = stored["model_config"]
    assert (config["in_channels"], config["input_size"], config["patch_size"]) == (32, 2, 1)
    assert stored["args"]["latent_norm"] == "per-channel"  # the checkpoint names its latent space and statistics
    assert [stored["latent_statistics"][key] for key in ("mean", "std")] == [statistics["mean"], statistics["std"]]

    decoded = []
    original = VAVAESpace.decode
    def counting_decode(self, z, precision="fp32"):
        decoded.append(tuple(z.shape))
        return original(self, z, precision)
    monkeypatch.setattr(VAVAESpace, "decode", counting_decode)
    sample_grid(ckpt, str(tmp_path / "grid.png"))
    assert decoded == [(2, 32, 2, 2)]
    assert Image.open(tmp_path / "grid.png").size == (2 * 32 + 3 * 2, 32 + 2 * 2)
    samples = tmp_path / "samples"
    sample_ddp.main(["ODE", "--ckpt", ckpt, "--num-sampling-steps", "2", "--sampling-method", "euler",
                     "--num-fid-samples", "2", "--per-proc-batch-size", "2", "--sample-dir", str(samples)])
    assert decoded[1:] == [(2, 32, 2, 2)]
    (npz,) = [name for name in os.listdir(samples) if name.endswith(".npz")]
    assert np.load(samples / npz)["arr_0"].shape == (2, 32, 32, 3)

    os.remove(path)
    error = pytest.raises(UsageError, sample_grid, ckpt, str(tmp_path / "grid2.png")).value
    assert_names(error, path, "no such file", VAVAE_REPO)


def test_diffusers_folder_round_trip(tmp_path, no_signals):
    """A 16-channel f4 folder with a shift: train.py --vae folder builds a 16-channel model and records the
    folder, sample.py decodes with it unnamed; a resumed run cannot switch to another shape; the folder
    replaced by another autoencoder: one line."""
    from train_configs import resolve_train_config

    folder = make_folder(str(tmp_path / "vae16"), 16, (8, 8, 8), scaling_factor=0.5, shift_factor=0.25)
    ckpt = train_with(folder, tmp_path, image_size=16)
    settings = read_settings(ckpt)
    assert settings["vae"] == folder
    with torch.serialization.safe_globals([argparse.Namespace]):
        config = torch.load(ckpt, map_location="cpu", weights_only=True)["model_config"]
    assert (config["in_channels"], config["input_size"]) == (16, 4)
    sample_grid(ckpt, str(tmp_path / "grid.png"))
    assert Image.open(tmp_path / "grid.png").size == (2 * 16 + 3 * 2, 16 + 2 * 2)

    args, explicit = train.parse_args(["--data-path", "x", "--vae", "ema"])
    error = pytest.raises(UsageError, resolve_train_config, vars(args), explicit, settings,
                          source="the checkpoint c.pt", train_steps=1).value
    assert_names(error, "--vae ema", "c.pt", folder, "channels, downsampling")

    make_folder(folder, 4, (8, 8, 8))  # the recorded folder now holds another autoencoder
    error = pytest.raises(UsageError, sample_grid, ckpt, str(tmp_path / "grid2.png")).value
    assert_names(error, folder, "4-channel", "16")
    error = pytest.raises(UsageError, sample_grid, ckpt, str(tmp_path / "grid2.png"), "--vae", "ema").value
    assert_names(error, "--vae ema", "4-channel", "16")
