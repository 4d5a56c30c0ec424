"""sit/training/repa.py and REPA in train.py: the loss against the formula by hand, where its gradients
go, the projector, real train.py runs with a tiny local ViT standing in for DINOv2 (resume bit-exact,
cached-latent REPA equal to online REPA, the checkpoint sampling loads), and bad inputs in one line."""
import json
import math
import os

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from conftest import assert_names, make_image_folder, make_tiny_vae
from models import SiT
from sit.errors import UsageError
from sit.training.repa import RepaSettings, RepaTerm, alignment_loss, build_projector, match_token_grid
from sit.training.step import TrainStep, losses_with_terms
from sit.training.terms import ModelWithTerms
from test_speed import run_script
from test_train import forbid_heavy_work, load, only_experiment
from transport import create_transport

TINY_CONFIG = {"depth": 2, "hidden_size": 32, "num_heads": 2}
TINY = ["--model", "SiT-S/2", "--model-config", json.dumps(TINY_CONFIG), "--image-size", "32", "--num-classes", "2"]
QUIET = ["--ckpt-every", "100000", "--sample-every", "100000"]
REPA = ["--repa-depth", "1", "--repa-projector-dim", "16", "--repa-coeff", "0.7"]


#################################################################################
#                            The loss and its gradients                         #
#################################################################################

def test_alignment_loss_equals_the_formula_by_hand():
    projected = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]],
                              [[0.0, 2.0, 0.0], [3.0, 0.0, 4.0]]])         # (N=2, T=2, D=3)
    targets = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                            [[0.0, 0.0, 1.0], [3.0, 0.0, 4.0]]])
    # cosines: sample 0: 1 and 1/sqrt(2); sample 1: 0 and 1
    expected = torch.tensor([-(1 + 1 / math.sqrt(2)) / 2, -(0 + 1) / 2])
    torch.testing.assert_close(alignment_loss(projected, targets), expected, rtol=0, atol=1e-7)

    generator = torch.Generator().manual_seed(0)
    projected = torch.randn(3, 4, 5, generator=generator)
    targets = torch.randn(3, 4, 5, generator=generator)
    by_hand = torch.zeros(3)
    for n in range(3):
        for t in range(4):
            a, b = projected[n, t].tolist(), targets[n, t].tolist()
            dot = sum(x * y for x, y in zip(a, b))
            by_hand[n] -= dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))) / 4
    torch.testing.assert_close(alignment_loss(projected, targets), by_hand, rtol=0, atol=1e-6)


def test_token_grids_are_matched_by_interpolation():
    tokens = torch.randn(2, 16, 3)
    assert match_token_grid(tokens, 16) is tokens
    constant = torch.ones(2, 16, 3) * torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(match_token_grid(constant, 4), torch.ones(2, 4, 3) * torch.tensor([1.0, -2.0, 0.5]))
    # 4 x 4 -> 2 x 2 by antialiased bilinear: each output token is the mean of its 2 x 2 block
    grid = torch.arange(16.0).view(1, 16, 1)
    expected = torch.tensor([[2.5], [4.5], [10.5], [12.5]]).view(1, 4, 1)
    torch.testing.assert_close(match_token_grid(grid, 4), expected)
    # the loss compares on the SiT's grid
    assert alignment_loss(torch.randn(2, 4, 3), torch.randn(2, 16, 3)).shape == (2,)
    with pytest.raises(ValueError, match="square"):
        match_token_grid(torch.randn(1, 6, 2), 4)


def test_projector_is_repas_mlp():
    projector = build_projector(32, 64, 24)
    shapes = [(type(layer).__name__, tuple(layer.weight.shape) if hasattr(layer, "weight") else None)
              for layer in projector]
    assert shapes == [("Linear", (64, 32)), ("SiLU", None), ("Linear", (64, 64)), ("SiLU", None), ("Linear", (24, 64))]
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in projector if hasattr(layer, "bias"))


def randomised_sit(depth: int = 4) -> SiT:
    """A tiny SiT with every weight random (the zero-initialised gates would hide gradients)."""
    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=depth, num_heads=2, num_classes=3,
                learn_sigma=False)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.1 * torch.randn_like(param))
    return model


def test_alignment_gradients_reach_only_blocks_up_to_the_depth_and_the_projector():
    model = randomised_sit(depth=4)
    term = RepaTerm(32, RepaSettings("tiny", repa_depth=2, repa_coeff=0.5, repa_projector_dim=16), encoder_dim=8)
    aligned = ModelWithTerms(model, [term])
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 2])
    _, heads = aligned(x, t, y)
    loss = alignment_loss(heads["repa"], torch.randn(2, 16, 8)).mean()
    named = [(name, param) for name, param in aligned.named_parameters() if param.requires_grad]
    grads = torch.autograd.grad(loss, [param for _, param in named], allow_unused=True)
    reached = {name for (name, _), grad in zip(named, grads) if grad is not None and grad.abs().sum() > 0}
    for name, _ in named:
        if name.startswith(("sit.blocks.2.", "sit.blocks.3.", "sit.final_layer.")):
            assert name not in reached, name
        else:  # embedders, blocks 0 and 1 (1-based 1 and 2), the term's projector
            assert name in reached, name


def test_alignment_keeps_the_transport_draws_and_the_sit_output():
    """The step with the REPA term draws noise and t as the plain loss does, has the same denoising loss,
    and optimises it plus coeff x the alignment loss."""
    model = randomised_sit(depth=2)
    term = RepaTerm(32, RepaSettings("tiny", repa_depth=1, repa_coeff=0.5, repa_projector_dim=16), encoder_dim=8)
    transport = create_transport()
    x1, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    model.eval()
    torch.manual_seed(4)
    plain = transport.training_losses(model, x1, dict(y=labels))["loss"].mean()
    targets = torch.randn(3, 16, 8)
    step = TrainStep.create(model, transport=transport, device=torch.device("cpu"), lr=1e-4, terms=[term])
    torch.manual_seed(4)
    denoising, total, named = losses_with_terms(step, x1, labels, [targets])
    assert torch.equal(plain, denoising) and named["Align Loss"].shape == ()
    torch.testing.assert_close(total, denoising + 0.5 * named["Align Loss"], rtol=0, atol=0)


#################################################################################
#                        Real train.py runs with a tiny encoder                 #
#################################################################################

def checkpoint_at(results_dir, step: int) -> dict:
    return load(os.path.join(only_experiment(results_dir), "checkpoints", f"{step:07d}.pt"))


def save_tiny_encoder(path: str) -> str:
    """A random ViT for 28 px inputs (32 px images), patch 7: 4 x 4 tokens of 64 dims (the SiT has 2 x 2)."""
    torch.manual_seed(1)
    torch.save(VisionTransformer(img_size=28, patch_size=7, embed_dim=64, depth=1, num_heads=1, num_classes=0,
                                 init_values=1e-5).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def repa_runs(tmp_path_factory):
    """Online REPA: 6 steps straight; 4 steps then --resume to 6. Cached: extract_features.py
    --repa-encoder, then 6 steps from the features. 8 images, batch 3: mid-epoch interruption."""
    root = tmp_path_factory.mktemp("repa")
    vae, data = make_tiny_vae(str(root / "vae")), make_image_folder(str(root / "data"), num_classes=2, per_class=4)
    encoder = save_tiny_encoder(str(root / "encoder.pt"))
    common = [*TINY, "--vae", vae, "--global-batch-size", "3", "--log-every", "1", "--num-workers", "0", *QUIET,
              "--repa-encoder", encoder, *REPA, "--time-sampling", "logit-normal", "--time-shift", "2"]
    online = ["--data-path", data, *common]
    runs = {name: run_script("train.py", [*online, "--results-dir", str(root / folder), "--max-steps", steps], str(root))
            for name, folder, steps in (("straight", "straight", "6"), ("first", "interrupted", "4"))}
    runs["resumed"] = run_script("train.py", ["--data-path", data, "--results-dir", str(root / "interrupted"),
                                              "--resume", "--max-steps", "6", "--log-every", "1", "--num-workers", "0",
                                              *QUIET], str(root))
    run_script("extract_features.py", ["--data-path", data, "--features-path", str(root / "feat"), "--image-size",
                                       "32", "--vae", vae, "--batch-size", "3", "--num-workers", "0", "--float32",
                                       "--repa-encoder", encoder], str(root))
    runs["cached"] = run_script("train.py", ["--feature-path", str(root / "feat"), *common, "--results-dir",
                                             str(root / "cached"), "--max-steps", "6"], str(root))
    return root, runs


def logged(results_dir) -> list[str]:
    with open(os.path.join(only_experiment(results_dir), "log.txt")) as handle:
        return [line.split("] ", 1)[1].split(", Train Steps")[0] for line in handle if "Train Loss" in line]


@pytest.mark.slow
def test_repa_resume_is_bit_exact(repa_runs):
    root, _ = repa_runs
    straight, resumed = checkpoint_at(root / "straight", 6), checkpoint_at(root / "interrupted", 6)
    for key in ("model", "ema", "projector"):
        stored_straight, stored_resumed = ((saved["extras"]["repa"] if key == "projector" else saved[key])
                                          for saved in (straight, resumed))
        assert stored_straight.keys() == stored_resumed.keys()
        for name in stored_straight:
            assert torch.equal(stored_straight[name], stored_resumed[name]), (key, name)
    for index, state in straight["opt"]["state"].items():
        assert torch.equal(state["exp_avg"], resumed["opt"]["state"][index]["exp_avg"])
    # both loss terms are logged, and the resumed run logs what the straight one did
    lines = logged(root / "straight")
    assert len(lines) == 6 and all(", Align Loss: " in line for line in lines)
    assert logged(root / "interrupted") == lines
    # the SiT's keys are the original's; the projector (hidden 32 -> 16 -> 16 -> 64) is beside them
    assert not any(name.startswith(("sit.", "projector.")) for name in straight["model"])
    assert straight["extras"]["repa"]["projector.4.weight"].shape == (64, 16)
    assert straight["args"]["repa_encoder"] == str(root / "encoder.pt") and straight["args"]["time_shift"] == 2.0


@pytest.mark.slow
def test_extracted_tokens_are_the_encoders_of_each_image_and_its_flip(repa_runs):
    import numpy as np
    from torchvision.datasets import ImageFolder

    from sit.data.features import read_meta
    from sit.data.images import image_transform
    from sit.encoders import load_encoder

    root, runs = repa_runs
    meta = read_meta(str(root / "feat"))
    assert meta["repa_encoder"] == str(root / "encoder.pt") and meta["repa_tokens_shape"] == [16, 64]
    dataset = ImageFolder(str(root / "data"), transform=image_transform(32))
    images = torch.stack([dataset[index][0] for index in range(len(dataset))])  # (8, 3, 32, 32)
    encoder = load_encoder(str(root / "encoder.pt"), 32, torch.device("cpu"))
    stored = np.load(str(root / "feat" / "repa_tokens.npy"))                   # (8, 2, 16, 64)
    np.testing.assert_allclose(stored[:, 0], encoder.patch_tokens(images).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored[:, 1], encoder.patch_tokens(images.flip(dims=[3])).numpy(), rtol=1e-5, atol=1e-6)
    assert "(64-dim tokens, cached)" in runs["cached"].stderr + runs["cached"].stdout
    assert all(", Align Loss: " in line for line in logged(root / "cached"))


class ContiguousPosterior:
    """A VAE whose posterior mean and std (hence its samples) are contiguous, as the cached ones are."""

    def __init__(self, vae):
        self.vae = vae

    def encode(self, images: torch.Tensor):
        encoded = self.vae.encode(images)
        posterior = encoded.latent_dist
        posterior.mean, posterior.std = posterior.mean.contiguous(), posterior.std.contiguous()
        return encoded


@pytest.mark.slow
def test_cached_latent_repa_equals_online_repa(repa_runs):
    """Training steps from the image folder (VAE and encoder online) and from the extracted features
    (posterior and tokens cached), from the same weights, on the same batches and flips, with the same
    seeds: the same posterior draw, x0, t and label dropout, so the same losses and weights (to float
    rounding: the VAE and the encoder saw other batch compositions).

    One thing is not REPA's and is set aside: on this CPU the tiny VAE returns channels-last latents,
    and x0 = randn_like(latents) (the original's draw) lays the same random numbers out in that memory
    order, unlike the contiguous cached latents; the online posterior is made contiguous here so that
    both paths draw the same x0."""
    from copy import deepcopy

    from sit.data.features import LatentFeatureDataset
    from sit.data.images import TrainImageFolder
    from sit.encoders import load_encoder
    from sit.training.step import TrainStep, train_step
    from sit.latents import load_latent_space
    from transport import TimeSchedule

    root, _ = repa_runs
    cpu = torch.device("cpu")
    datasets = {"online": TrainImageFolder(str(root / "data"), 32, seed=0),
                "cached": LatentFeatureDataset(str(root / "feat"), seed=0, with_tokens=True)}
    vae = ContiguousPosterior(load_latent_space(str(root / "vae"), cpu).network)
    encoder = load_encoder(str(root / "encoder.pt"), 32, cpu)
    torch.manual_seed(0)
    model = SiT(input_size=4, in_channels=4, num_classes=2, patch_size=2, **TINY_CONFIG)
    settings = RepaSettings(str(root / "encoder.pt"), repa_depth=1, repa_coeff=0.7, repa_projector_dim=16)
    term = RepaTerm(32, settings, encoder_dim=64)
    batches = [(0, [0, 5, 3]), (0, [7, 1, 2]), (1, [4, 6, 0]), (1, [2, 3, 1])]  # (epoch, indices): flips differ
    results = {}
    for kind, dataset in datasets.items():
        sit, head = deepcopy(model), deepcopy(term)
        head.encoder = encoder if kind == "online" else None
        step = TrainStep.create(sit, device=cpu, lr=1e-4,
                                transport=create_transport(time_schedule=TimeSchedule("logit-normal", shift=2.0)),
                                vae=vae if kind == "online" else None, from_features=kind == "cached", terms=[head])
        step.ddp_model.train()
        losses = []
        for number, (epoch, indices) in enumerate(batches):
            items = [dataset[(epoch, index)] for index in indices]
            *inputs, labels = [torch.stack([torch.as_tensor(item[part]) for item in items]) for part in range(len(items[0]))]
            torch.manual_seed(100 + number)
            result = train_step(step, inputs, labels)
            losses.append((result.loss.item(), result.terms["Align Loss"].item()))
        results[kind] = (losses, sit.state_dict(), head.state_dict())
    (online_losses, online_sit, online_head), (cached_losses, cached_sit, cached_head) = results.values()
    for online_pair, cached_pair in zip(online_losses, cached_losses):
        assert cached_pair == pytest.approx(online_pair, rel=1e-5, abs=1e-6)
    for online_weights, cached_weights in ((online_sit, cached_sit), (online_head, cached_head)):
        for name in online_weights:
            torch.testing.assert_close(cached_weights[name], online_weights[name], rtol=1e-5, atol=1e-6)
    assert online_losses[0] != online_losses[1]  # the steps are not trivially alike


@pytest.mark.slow
def test_repa_checkpoint_samples_as_a_plain_sit(repa_runs):
    from sit.checkpoint import load_model

    root, _ = repa_runs
    path = os.path.join(only_experiment(root / "straight"), "checkpoints", "0000006.pt")
    model, info = load_model(path)
    assert info["num_classes"] == 2 and model.config["depth"] == 2
    torch.testing.assert_close(model.state_dict()["final_layer.linear.weight"], load(path)["ema"]["final_layer.linear.weight"])


#################################################################################
#                                   Bad inputs                                  #
#################################################################################

def test_bad_repa_and_time_inputs_end_with_one_line_before_heavy_work(tmp_path, monkeypatch):
    import train

    forbid_heavy_work(monkeypatch)
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=1, size=16)
    encoder = save_tiny_encoder(str(tmp_path / "encoder.pt"))
    os.makedirs(tmp_path / "vae")
    base = ["--data-path", data, "--vae", str(tmp_path / "vae"), *TINY]
    pixels = ["--data-path", data, "--vae", "none", "--model", "SiT-S/2", "--model-config", json.dumps(TINY_CONFIG),
              "--num-classes", "2"]
    cases = [
        (base + ["--repa-encoder", "dinov3-vit-b"], "unknown --repa-encoder dinov3-vit-b: give dinov2-vit-s/b/l/g"),
        (base + ["--repa-encoder", encoder, "--repa-depth", "3"],
         "--repa-depth 3 is beyond the model's 2 blocks (1..2)"),
        (pixels + ["--image-size", "40", "--repa-encoder", "dinov2-vit-b"],
         "--image-size 40 gives --repa-encoder vit_base_patch14_dinov2.lvd142m inputs of 35 px (224/256 of the image, "
         "as REPA), not a multiple of its patch size 14: use an --image-size that is a multiple of 16"),
        (base + ["--repa-depth", "1"], "--repa-depth is read only with --repa-encoder"),
        (base + ["--repa-coeff", "0.2"], "--repa-coeff is read only with --repa-encoder"),
        (base + ["--repa-projector-dim", "64"], "--repa-projector-dim is read only with --repa-encoder"),
        (base + ["--time-mean", "0.5"], "--time-mean is read only with --time-sampling logit-normal"),
        (base + ["--time-std", "2"], "--time-std is read only with --time-sampling logit-normal"),
        (["--feature-path", str(tmp_path / "no_features"), *TINY, "--repa-encoder", encoder, "--repa-depth", "1"],
         "run extract_features.py"),
    ]
    for argv, expected in cases:
        with pytest.raises(UsageError) as error:
            train.main(argv)
        message = str(error.value)
        assert "\n" not in message and expected in message, (argv, message)


@pytest.mark.parametrize("argv, expected", [
    (["--repa-coeff", "-0.5"], "argument --repa-coeff: must be >= 0, got -0.5"),
    (["--repa-depth", "0"], "argument --repa-depth: must be a positive integer, got 0"),
    (["--time-sampling", "lognormal"], "argument --time-sampling: invalid choice: 'lognormal'"),
    (["--time-shift", "0"], "argument --time-shift: must be a positive number, got 0"),
    (["--time-std", "-1"], "argument --time-std: must be a positive number, got -1"),
])
def test_single_flag_errors_are_argparse_errors(argv, expected, capsys):
    import train

    with pytest.raises(SystemExit) as error:
        train.main(["--data-path", "x", *argv])
    assert error.value.code == 2 and expected in capsys.readouterr().err


def write_arrays(feat: str, meta: dict) -> None:
    """Zero arrays that agree with meta.json (sit.data.features.stored_arrays), so that read_meta accepts it."""
    from sit.data.features import stored_arrays

    for name, (shape, dtype) in stored_arrays(meta).items():
        np.lib.format.open_memmap(os.path.join(feat, f"{name}.npy"), mode="w+", dtype=dtype, shape=shape).flush()


def test_features_without_tokens_or_of_another_encoder_are_refused(tmp_path, monkeypatch):
    import train
    from sit.data.features import write_meta

    forbid_heavy_work(monkeypatch)
    encoder = save_tiny_encoder(str(tmp_path / "encoder.pt"))
    feat = str(tmp_path / "feat")
    os.makedirs(feat)
    meta = dict(image_size=32, vae="ema", num_images=2, classes=["a", "b"], dtype="float32", block_size=2,
                latent_shape=[4, 4, 4], complete=True)
    write_meta(feat, meta)
    write_arrays(feat, meta)
    with pytest.raises(UsageError) as error:
        train.main(["--feature-path", feat, *TINY, "--repa-encoder", encoder, "--repa-depth", "1"])
    assert str(error.value) == (f"--repa-encoder {encoder} with --feature-path {feat}, which holds no encoder tokens: "
                                f"run extract_features.py --repa-encoder {encoder} into a new --features-path")
    write_meta(feat, dict(meta, repa_encoder="vit_base_patch14_dinov2.lvd142m", repa_tokens_shape=[256, 768]))
    write_arrays(feat, dict(meta, repa_encoder="vit_base_patch14_dinov2.lvd142m", repa_tokens_shape=[256, 768]))
    with pytest.raises(UsageError, match="which holds tokens of vit_base_patch14_dinov2.lvd142m"):
        train.main(["--feature-path", feat, *TINY, "--repa-encoder", encoder, "--repa-depth", "1"])


def test_resume_cannot_switch_alignment_on_or_off():
    import train
    from train_configs import resolve_train_config

    def resolve(argv: list, stored: dict):
        args, explicit = train.parse_args(["--data-path", "x", *argv])
        return resolve_train_config(vars(args), explicit, stored, source="the checkpoint c.pt", train_steps=5)

    with pytest.raises(UsageError) as error:
        resolve(["--repa-encoder", "dinov2-vit-b"], {"repa_encoder": None})
    assert str(error.value) == ("--repa-encoder vit_base_patch14_dinov2.lvd142m but the checkpoint c.pt was trained "
                                "with --repa-encoder None; alignment cannot be switched on or off in a resumed run: "
                                "start a new experiment")
    config, warnings = resolve([], {"repa_encoder": "vit_base_patch14_dinov2.lvd142m", "repa_depth": 4,
                                    "time_sampling": "logit-normal", "time_shift": 3.0})
    assert config.features["repa"].repa_encoder == "vit_base_patch14_dinov2.lvd142m" and config.features["repa"].repa_depth == 4
    assert config.time.schedule().shift == 3.0 and warnings == []
    with pytest.raises(UsageError, match="--repa-depth 2 .*c.pt.*--repa-depth 4"):
        resolve(["--repa-depth", "2"], {"repa_encoder": "vit_base_patch14_dinov2.lvd142m", "repa_depth": 4})
    _, warnings = resolve(["--repa-coeff", "0.1", "--time-sampling", "uniform"],
                          {"repa_encoder": "vit_base_patch14_dinov2.lvd142m", "repa_coeff": 0.5,
                           "time_sampling": "logit-normal"})
    assert sorted(warning.split(" replaces")[0] for warning in warnings) == ["--repa-coeff 0.1", "--time-sampling uniform"]


def test_tokens_of_another_width_or_grid_than_the_encoders_are_refused_at_open(tmp_path, monkeypatch):
    """A feature folder whose meta.json and repa_tokens.npy were rewritten consistently to another shape
    than the encoder gives (the tiny encoder: 4 x 4 patches of 64 dims for 32 px images) is refused in one
    line naming the folder and both shapes, before any heavy work; the encoder's own shape is accepted."""
    import train
    from sit.data.features import write_meta

    forbid_heavy_work(monkeypatch)
    encoder = save_tiny_encoder(str(tmp_path / "encoder.pt"))
    feat = str(tmp_path / "feat")
    os.makedirs(feat)
    meta = dict(image_size=32, vae="ema", num_images=2, classes=["a", "b"], dtype="float32", block_size=2,
                latent_shape=[4, 4, 4], complete=True, repa_encoder=encoder)
    argv = ["--feature-path", feat, *TINY, "--repa-encoder", encoder, "--repa-depth", "1", "--global-batch-size", "2"]
    for shape in ([16, 32], [4, 64], [64, 64]):  # another width; another grid (2 x 2, 8 x 8)
        write_meta(feat, dict(meta, repa_tokens_shape=shape))
        write_arrays(feat, dict(meta, repa_tokens_shape=shape))
        with pytest.raises(UsageError) as error:
            train.main(argv)
        line = assert_names(error.value, f"--feature-path {feat}", str(shape), "[16, 64]", "extract_features.py")
        assert line.index(str(shape)) < line.index("[16, 64]"), line  # what it holds, then what the encoder gives
    write_meta(feat, dict(meta, repa_tokens_shape=[16, 64]))
    write_arrays(feat, dict(meta, repa_tokens_shape=[16, 64]))
    with pytest.raises(AssertionError, match="heavy work started"):  # past every check of the input
        train.main(argv)
