"""configs/*.yaml, the published recipes: each parses with its script and trains one step at tiny size (the
flags below override what a CPU cannot run: the data, the VAE, the model's size, the run's length)."""
import glob
import json
import os

import pytest
import torch
import yaml

import train
from conftest import REPO, make_image_folder, make_tiny_vae
from test_repa import save_tiny_encoder

RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
TINY_MODEL = json.dumps({"depth": 2, "hidden_size": 32, "num_heads": 2})


def test_the_recipes_are_there():
    names = {os.path.basename(path) for path in RECIPES}
    assert {"digits.yaml", "sit-b-2.yaml", "sit-l-2.yaml", "sit-xl-2.yaml", "repa-sit-xl-2.yaml", "lightningdit-xl-1.yaml",
            "meanflow-b-2.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_a_recipe_states_its_published_figures_and_parses(recipe):
    with open(recipe) as handle:
        text = handle.read()
    assert text.startswith("# ") and ("Published:" in text or "Aims at:" in text)
    settings = yaml.safe_load(text)
    args, explicit = train.parse_args(["--config", recipe] + ([] if "data_path" in settings else ["--data-path", "/d"]))
    for key, value in settings.items():
        parsed = getattr(args, key.replace("-", "_"))
        assert parsed == (tuple(value) if isinstance(value, list) else value), key
        assert key.replace("-", "_") in explicit


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_a_recipe_trains_one_step_at_tiny_size(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(recipe) as handle:
        settings = yaml.safe_load(handle)
    pixels = settings.get("vae") == "none"
    size = settings["image_size"] if pixels else 32
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=size)
    overrides = ["--data-path", data, "--model-config", TINY_MODEL, "--image-size", str(size), "--global-batch-size",
                 "2", "--max-steps", "1", "--num-workers", "0", "--precision", "fp32", "--results-dir", "results"]
    if not pixels:
        overrides += ["--vae", make_tiny_vae(str(tmp_path / "vae"))]
    if settings.get("latent_norm") == "per-channel":  # trains from cached features and their statistics
        import extract_features
        extract_features.main(["--data-path", data, "--features-path", "features", "--vae", overrides[-1],
                               "--image-size", str(size), "--batch-size", "2", "--num-workers", "0"])
        overrides[:2] = ["--feature-path", "features"]
    if "repa_encoder" in settings:
        overrides += ["--repa-encoder", save_tiny_encoder(str(tmp_path / "encoder.pt")), "--repa-depth", "1",
                      "--repa-projector-dim", "16"]
    train.main(["--config", recipe, *overrides])
    (experiment,) = os.listdir("results")
    stored = torch.load(os.path.join("results", experiment, "checkpoints", "0000001.pt"), weights_only=True)["args"]
    kept = {key: value for key, value in settings.items() if f"--{key.replace('_', '-')}" not in overrides}
    assert {key: stored[key] for key in kept} == {key: tuple(value) if isinstance(value, list) else value
                                                  for key, value in kept.items()}
