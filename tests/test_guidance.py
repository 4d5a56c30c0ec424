"""Autoguidance (sit.guidance, sit.sampling.guide): the guided model equals D_guide + w (D_main - D_guide)
computed by hand, a guide equal to the main model gives the unguided samples exactly, --cfg-interval
leaves the main model alone outside it, and a guide that cannot guide is one line naming --guide-ckpt (the
main model's own weights included: the same file or a copy; its raw weights beside EMA ones may guide it)."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sample_ddp
from models import SiT
from sit.config import GuidanceConfig, ODEConfig, SDEConfig, TransportConfig, build_sample_fn
from sit.errors import UsageError
from sit.generation import generate_latents
from sit.guidance import AutoGuidedModel
from sit.sampling.loading import load_for_sampling
from test_sample import TINY, write_checkpoint
from conftest import assert_names


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_vae):
    """A main model and a weaker guide (other random weights, half the width), same classes and latents."""
    folder = tmp_path_factory.mktemp("guided")
    return dict(main=write_checkpoint(folder / "main.pt", tiny_vae, seed=0),
                guide=write_checkpoint(folder / "guide.pt", tiny_vae, seed=1, hidden_size=16),
                classes=write_checkpoint(folder / "classes.pt", tiny_vae, seed=2, num_classes=7),
                size=write_checkpoint(folder / "size.pt", tiny_vae, seed=3, input_size=8),
                noise=write_checkpoint(folder / "noise.pt", tiny_vae, seed=4, prediction="noise"))


def random_sit(seed: int, **config) -> SiT:
    torch.manual_seed(seed)
    model = SiT(**{**TINY, **config}).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.05)
    return model


@torch.no_grad()
def test_the_guided_output_is_the_formula_on_every_channel():
    main, guide = random_sit(0), random_sit(1, depth=2)
    x, t, y = torch.randn(3, 4, 4, 4), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([1, 2, 3])
    guided = AutoGuidedModel(main, guide, scale=2.5)(x, t, y)
    by_hand = guide(x, t, y) + 2.5 * (main(x, t, y) - guide(x, t, y))
    assert torch.equal(guided, by_hand)
    assert guided.shape == (3, 4, 4, 4)  # all 4 channels guided, unlike forward_with_cfg's first 3


@torch.no_grad()
def test_outside_the_interval_the_output_is_the_main_models_alone():
    main, guide = random_sit(0), random_sit(1)
    x, y = torch.randn(3, 4, 4, 4), torch.tensor([1, 2, 3])
    t = torch.tensor([0.1, 0.5, 0.9])
    guided = AutoGuidedModel(main, guide, scale=3.0, interval=(0.3, 0.6))(x, t, y)
    assert torch.equal(guided[[0, 2]], main(x, t, y)[[0, 2]])
    assert torch.equal(guided[1], (guide(x, t, y) + 3.0 * (main(x, t, y) - guide(x, t, y)))[1])
    calls = []
    guide.register_forward_hook(lambda *_: calls.append(1))
    outside = AutoGuidedModel(main, guide, scale=3.0, interval=(0.3, 0.6))(x, torch.full((3,), 0.9), y)
    assert torch.equal(outside, main(x, torch.full((3,), 0.9), y)) and not calls  # the guide is not even evaluated


@pytest.mark.parametrize("sampler", [ODEConfig("euler", 6), SDEConfig("Euler", 6)])
def test_a_guide_equal_to_the_main_model_gives_the_unguided_samples_exactly(sampler):
    main = random_sit(0)
    z, y = torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 2, 3])
    sample_fn = build_sample_fn(TransportConfig(), sampler)
    torch.manual_seed(7)
    unguided = generate_latents(sample_fn, main, z, y, GuidanceConfig(1.0))
    torch.manual_seed(7)
    guided = generate_latents(sample_fn, AutoGuidedModel(main, main, scale=4.0), z, y, GuidanceConfig(4.0))
    assert torch.equal(guided, unguided)


def test_sample_py_autoguides_with_a_model_from_its_checkpoint(checkpoints, tmp_path):
    """The guide's size comes from its checkpoint; the guided grid differs from the classifier-free one."""
    common = ["ODE", "--ckpt", checkpoints["main"], "--class-labels", "1,2", "--sampling-method", "euler",
              "--num-sampling-steps", "4", "--cfg-scale", "2"]
    sample.main([*common, "--guide-ckpt", checkpoints["guide"], "--output", str(tmp_path / "auto.png")])
    sample.main([*common, "--output", str(tmp_path / "cfg.png")])
    args, config = sample.parse_args([*common, "--guide-ckpt", checkpoints["guide"]])
    loaded = load_for_sampling(config, torch.device("cpu"), "mse")
    assert isinstance(loaded.model, AutoGuidedModel) and loaded.model.guide.config["hidden_size"] == 16
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "auto.png")), np.asarray(Image.open(tmp_path / "cfg.png")))


@pytest.mark.parametrize("case, message", [
    ("classes", "{path} | classes"),  # the words of the message (" | " between): the guide's file and a key word
    ("size", "{path} | latents"),
    ("noise", "{path} | noise"),
])
def test_a_guide_that_cannot_guide_is_one_line_naming_the_flag(checkpoints, case, message):
    argv = ["ODE", "--ckpt", checkpoints["main"], "--class-labels", "1", "--cfg-scale", "2",
            "--guide-ckpt", checkpoints[case]]
    with pytest.raises(UsageError) as error:
        sample.main(argv)
    assert_names(error.value, "--guide-ckpt", *message.format(path=checkpoints[case]).split(" | "))
    with pytest.raises(UsageError, match="^--guide-ckpt: no SiT checkpoint at"):
        sample.main(argv[:-1] + [checkpoints[case] + ".missing"])


def test_a_guide_holding_the_main_models_own_weights_is_refused_and_its_raw_weights_may_guide(checkpoints, tmp_path):
    main = checkpoints["main"]
    shutil.copy(main, tmp_path / "copy.pt")
    for guide in (main, str(tmp_path / "copy.pt")):  # the same file, or the same weights in another
        with pytest.raises(UsageError) as error:
            sample.main(["ODE", "--ckpt", main, "--class-labels", "1", "--cfg-scale", "2", "--guide-ckpt", guide])
        assert_names(error.value, f"--guide-ckpt {guide}", f"--ckpt {main}", "itself", "--cfg-scale")
    # a checkpoint whose EMA weights differ from its raw ones, and a file of those raw weights alone
    checkpoint = torch.load(main, weights_only=False)
    checkpoint["ema"] = {name: value + 0.01 if value.is_floating_point() else value
                         for name, value in checkpoint["model"].items()}
    torch.save(checkpoint, tmp_path / "ema.pt")
    torch.save({"model": checkpoint["model"]}, tmp_path / "raw.pt")
    args, config = sample.parse_args(["ODE", "--ckpt", str(tmp_path / "ema.pt"), "--class-labels", "1",
                                      "--cfg-scale", "2", "--guide-ckpt", str(tmp_path / "raw.pt")])
    loaded = load_for_sampling(config, torch.device("cpu"), "mse")
    assert isinstance(loaded.model, AutoGuidedModel)
    assert not torch.equal(loaded.model.main.x_embedder.proj.weight, loaded.model.guide.x_embedder.proj.weight)


def test_guide_with_likelihood_is_refused(checkpoints):
    with pytest.raises(UsageError, match="drop --guide-ckpt"):
        sample_ddp.parse_args(["ODE", "--likelihood", "--ckpt", checkpoints["main"], "--guide-ckpt", checkpoints["guide"]])


def test_sample_ddp_names_the_guide_in_its_folder_and_record(checkpoints, tmp_path):
    flags = ["SDE", "--ckpt", checkpoints["main"], "--num-sampling-steps", "4", "--num-fid-samples", "3",
             "--cfg-scale", "2", "--cfg-interval", "0.2", "1"]
    sample_ddp.main([*flags, "--guide-ckpt", checkpoints["guide"], "--sample-dir", str(tmp_path / "auto")])
    sample_ddp.main([*flags, "--sample-dir", str(tmp_path / "cfg")])
    (auto,) = [name for name in os.listdir(tmp_path / "auto") if name.endswith(".json")]
    (cfg,) = [name for name in os.listdir(tmp_path / "cfg") if name.endswith(".json")]
    assert auto.replace(".json", "").startswith(cfg.replace(".json", "")) and "-guide-guide-" in auto
    with open(tmp_path / "auto" / auto) as handle:
        record = json.load(handle)
    with open(checkpoints["guide"], "rb") as handle:
        assert record["guide_checkpoint_sha256"] == hashlib.sha256(handle.read()).hexdigest()
    assert record["guide_checkpoint"] == checkpoints["guide"] and record["guided_channels"] == 4
    assert record["guidance_interval"] == [0.2, 1.0]
    with open(tmp_path / "cfg" / cfg) as handle:
        assert "guide_checkpoint" not in json.load(handle)  # records without autoguidance are as before
    auto_images = np.load(tmp_path / "auto" / auto.replace(".json", ".npz"))["arr_0"]
    assert not np.array_equal(auto_images, np.load(tmp_path / "cfg" / cfg.replace(".json", ".npz"))["arr_0"])
