"""LightningDiT's block options (models.ModelConfig's rope, swiglu, rms_norm, qk_norm) and the patch-1 models:
exact values, the properties that define them, SDPA kept as the kernel, and no graph break under --compile."""
import itertools
import json
import math

import pytest
import torch

import models
from models import ModelConfig

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=4)
OPTIONS = models.BLOCK_OPTIONS


def randomized(model: models.SiT, seed: int = 0) -> models.SiT:
    """Every weight perturbed (the zero-initialised adaLN and output layers would hide differences)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def test_rope_tables_of_a_2x2_grid_by_hand():
    # head size 8: pairs (0,1) and (2,3) turn by the row index at frequencies 1 and 10000 ** -0.5, pairs
    # (4,5) and (6,7) by the column index at the same frequencies
    cos, sin = models.rope_tables(2, 8)
    for token, (row, column) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        angles = [row, row, row / 100, row / 100, column, column, column / 100, column / 100]
        torch.testing.assert_close(cos[token], torch.tensor([math.cos(a) for a in angles]), rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[token], torch.tensor([math.sin(a) for a in angles]), rtol=0, atol=1e-6)


def test_rope_turns_pairs_and_keeps_norms():
    cos, sin = models.rope_tables(3, 8)
    x = torch.randn(2, 1, 9, 8, dtype=torch.float64)
    turned = models.apply_rope(x, cos.double(), sin.double())
    torch.testing.assert_close(turned.norm(dim=-1), x.norm(dim=-1))
    # pair (x0, x1) by angle a: (x0 cos a - x1 sin a, x1 cos a + x0 sin a)
    a = 1.0 * 2  # token 7 = row 2, column 1: the first pair turns by the row index at frequency 1
    x0, x1 = x[..., 7, 0], x[..., 7, 1]
    torch.testing.assert_close(turned[..., 7, 0], x0 * math.cos(a) - x1 * math.sin(a), rtol=0, atol=1e-6)
    torch.testing.assert_close(turned[..., 7, 1], x1 * math.cos(a) + x0 * math.sin(a), rtol=0, atol=1e-6)


def test_rope_makes_scores_depend_on_the_offset_between_patches_only():
    grid, head = 5, 16
    cos, sin = [table.double().reshape(grid, grid, head) for table in models.rope_tables(grid, head)]
    q, k = torch.randn(head, dtype=torch.float64), torch.randn(head, dtype=torch.float64)

    def score(q_at: tuple[int, int], k_at: tuple[int, int]) -> float:
        turn = lambda x, at: models.apply_rope(x[None, None, None], cos[at][None], sin[at][None])[0, 0, 0]  # noqa: E731
        return float(turn(q, q_at) @ turn(k, k_at))

    assert score((0, 1), (2, 0)) == pytest.approx(score((2, 3), (4, 2)), abs=1e-6)  # the same offset (2, -1)
    assert score((1, 1), (1, 1)) == pytest.approx(float(q @ k), abs=1e-6)             # offset 0: no turn
    assert score((0, 1), (2, 0)) != pytest.approx(score((0, 1), (0, 2)), abs=1e-6)    # another offset


def test_rms_norm_and_swiglu_by_their_formulas():
    norm = models.RMSNorm(2)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    rms = math.sqrt((3 ** 2 + 4 ** 2) / 2 + 1e-6)
    torch.testing.assert_close(norm(torch.tensor([[3.0, 4.0]])), torch.tensor([[3 / rms, 8 / rms]]))

    swiglu = models.SwiGLU(1152, 4608)  # SiT-XL's MLP width: LightningDiT's SwiGLU keeps 2/3 of it
    assert swiglu.w12.weight.shape == (6144, 1152) and swiglu.w3.weight.shape == (1152, 3072)
    x = torch.randn(3, 1152)
    gate, value = swiglu.w12(x)[:, :3072], swiglu.w12(x)[:, 3072:]
    torch.testing.assert_close(swiglu(x), swiglu.w3(gate * torch.sigmoid(gate) * value))


def test_all_options_off_is_the_original_block_and_each_option_changes_the_output():
    torch.manual_seed(0)
    original = randomized(models.SiT(**TINY))
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 3])
    with torch.no_grad():
        reference = original(x, t, y)
    off = models.SiT(**TINY, **{option: False for option in OPTIONS}).eval()
    off.load_state_dict(original.state_dict(), strict=True)
    assert off.config == original.config
    with torch.no_grad():
        assert torch.equal(off(x, t, y), reference)
    for option in OPTIONS:
        torch.manual_seed(0)
        model = randomized(models.SiT(**TINY, **{option: True}))
        shared = {key: value for key, value in original.state_dict().items() if key in model.state_dict()}
        model.load_state_dict(shared, strict=False)  # the same weights where the names agree
        with torch.no_grad():
            assert not torch.allclose(model(x, t, y), reference, atol=1e-4), option


@pytest.mark.parametrize("chosen", [combo for size in range(1, 5) for combo in itertools.combinations(OPTIONS, size)])
def test_every_combination_builds_trains_and_counts_its_parameters(chosen):
    config = dict(TINY, **{option: True for option in chosen})
    torch.manual_seed(0)
    model = randomized(models.SiT(**config)).train()
    model.grad_checkpointing = True
    model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert ModelConfig.from_dict(model.config).parameter_count() == sum(p.numel() for p in model.parameters())
    recovered = models.model_config_from_state_dict(model.state_dict())  # RoPE has no weights: read as off
    # the head count is in QK-norm's weights; else, of an unpublished width, width // 64 (at least 1)
    expected = {**model.config, "num_heads": 2 if "qk_norm" in chosen else 1}
    expected.pop("rope", None)
    assert recovered == expected
    models.SiT(**recovered).load_state_dict(model.state_dict(), strict=True)


def test_patch_1_and_lightningdit_names():
    with torch.device("meta"):
        xl = models.SiT_models["LightningDiT-XL/1"](input_size=16, in_channels=32)  # VA-VAE latents of 256 px
        sit_xl = models.SiT_models["SiT-XL/1"](input_size=16, in_channels=32)
    assert {k: xl.config[k] for k in ("patch_size", "rope", "swiglu", "rms_norm", "learn_sigma")} == dict(
        patch_size=1, rope=True, swiglu=True, rms_norm=True, learn_sigma=False)
    assert "qk_norm" not in xl.config  # off in LightningDiT's released configs
    # LightningDiT's own LightningDiT-XL/1 (use_swiglu, use_rope, use_rmsnorm, 32 channels) has this many parameters
    assert sum(p.numel() for p in xl.parameters()) == 675_256_736
    assert models.model_name_for_config(xl.config) == "LightningDiT-XL/1"
    assert models.model_name_for_config(sit_xl.config) == "SiT-XL/1"
    assert models.model_name_for_config({**xl.config, "qk_norm": True}) is None  # a custom design
    for name in ("SiT-B/1", "SiT-L/1", "LightningDiT-B/1"):
        with torch.device("meta"):
            assert models.model_name_for_config(models.SiT_models[name](input_size=4).config) == name
    assert models.model_design("SiT-L/1") == dict(depth=24, hidden_size=1024, patch_size=1, num_heads=16)


def test_rope_that_cannot_cover_the_grid_is_one_line(tmp_path):
    import train
    from conftest import make_image_folder
    from sit.errors import UsageError

    with pytest.raises(ValueError, match=r"rope needs a head size .* divisible by 4 .* got 36 / 6 = 6$"):
        models.SiT(**dict(TINY, hidden_size=36, num_heads=6), rope=True)
    data = make_image_folder(str(tmp_path / "data"), per_class=1, size=8)
    with pytest.raises(UsageError) as error:
        train.main(["--data-path", data, "--vae", "none", "--image-size", "8", "--num-classes", "2", "--model-config",
                    json.dumps({"hidden_size": 36, "num_heads": 6, "depth": 1, "rope": True}),
                    "--results-dir", str(tmp_path / "results")])
    assert str(error.value) == ("--model SiT-XL/2 with --model-config: the model config's rope needs a head size "
                                "(hidden_size / num_heads) divisible by 4 to cover the patch grid's rows and columns, "
                                "got 36 / 6 = 6")


def test_attention_with_rope_and_qk_norm_stays_one_fused_sdpa_call():
    """On the CPU too PyTorch has a flash kernel: the attention runs with only it allowed, and no softmax
    (a materialised attention matrix) appears in the trace."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import profile

    attention = models.Attention(64, 4, qk_norm=True, rms_norm=True)
    x = torch.randn(2, 16, 64, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), profile() as prof:
        attention(x, models.rope_tables(4, 16)).sum().backward()
    names = {event.name for event in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert not any("softmax" in name for name in names)


def test_compile_adds_no_graph_break_with_every_option(monkeypatch):
    """train.py's --compile (sit.speed.compile_model: every block) through training steps with gradient
    checkpointing, and the whole guided forward as sample.py compiles it: dynamo's graph-break counter
    stays 0. The aot_eager backend traces what Inductor would but generates no kernels (seconds on a CPU)."""
    from torch._dynamo.utils import counters

    from sit.speed import compile_model

    compile_block = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_block(self, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    try:
        torch.manual_seed(0)
        model = randomized(models.SiT(**TINY, **{option: True for option in OPTIONS})).train()
        model.grad_checkpointing = True
        compile_model(model)
        x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
        for _ in range(2):
            model(x, torch.rand(2), y).square().mean().backward()
        sampler = torch.compile(model.eval().forward_with_cfg, backend="aot_eager", dynamic=False)
        with torch.no_grad():
            guided = sampler(torch.cat([x, x]), torch.full((4,), 0.5), torch.tensor([0, 1, 4, 4]), 1.5)
        assert guided.shape == (4, 3, 8, 8) and torch.isfinite(guided).all()
        assert counters["stats"]["unique_graphs"] > 0  # dynamo did trace
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


def test_a_lightningdit_name_trains_and_its_checkpoint_rebuilds_the_same_design(tmp_path, monkeypatch):
    """--model LightningDiT-B/1 shrunk by --model-config: the options the name selects reach the checkpoint,
    and load_model (sample.py's loader) rebuilds that design from it."""
    import train
    from conftest import make_image_folder
    from sit.checkpoint import load_model
    from sit.training.signals import StopSignal

    monkeypatch.setattr(StopSignal, "install", lambda self: None)
    data = make_image_folder(str(tmp_path / "data"), per_class=1, size=8)
    train.main(["--data-path", data, "--vae", "none", "--image-size", "8", "--num-classes", "2", "--model",
                "LightningDiT-B/1", "--model-config", json.dumps({"depth": 1, "hidden_size": 32, "num_heads": 2}),
                "--results-dir", str(tmp_path / "results"), "--global-batch-size", "2", "--max-steps", "1",
                "--num-workers", "0", "--sample-every", "100"])
    (experiment,) = (tmp_path / "results").iterdir()
    checkpoint = str(experiment / "checkpoints" / "0000001.pt")
    stored = torch.load(checkpoint, weights_only=True)["model_config"]
    assert stored == dict(input_size=8, patch_size=1, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                          mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=2, learn_sigma=False,
                          rope=True, swiglu=True, rms_norm=True)
    model, _ = load_model(checkpoint)
    assert model.config == stored and isinstance(model.blocks[0].mlp, models.SwiGLU) and model.rope


@pytest.mark.slow
def test_extraction_and_training_at_512_px(tmp_path, monkeypatch):
    """extract_features.py and train.py at --image-size 512 (the SiT-XL/2 512 setting: 64x64 SD-VAE latents)
    with a random tiny VAE of SD-VAE's geometry, two images and a tiny model; the checkpoint says 512 px."""
    import extract_features
    import train
    from conftest import make_image_folder, make_tiny_vae
    from sit.checkpoint import load_model
    from sit.training.signals import StopSignal

    monkeypatch.setattr(StopSignal, "install", lambda self: None)
    vae = make_tiny_vae(str(tmp_path / "vae"))
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=1, size=512)
    features = str(tmp_path / "features")
    extract_features.main(["--data-path", data, "--features-path", features, "--image-size", "512", "--vae", vae,
                           "--batch-size", "2", "--num-workers", "0", "--float32"])
    with open(tmp_path / "features" / "meta.json") as file:
        assert json.load(file)["latent_shape"] == [4, 64, 64]
    train.main(["--feature-path", features, "--vae", vae, "--image-size", "512", "--num-classes", "2",
                "--model-config", json.dumps({"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 8}),
                "--results-dir", str(tmp_path / "results"), "--global-batch-size", "2", "--max-steps", "2",
                "--num-workers", "0", "--sample-every", "100", "--ckpt-every", "2"])
    (experiment,) = (tmp_path / "results").iterdir()
    model, info = load_model(str(experiment / "checkpoints" / "0000002.pt"))
    assert (model.config["input_size"], info["image_size"]) == (64, 512)


def test_the_digits_benchmark_trains_the_readme_model_with_only_the_block_changed():
    import sys

    from conftest import REPO

    sys.path.insert(0, f"{REPO}/benchmarks")
    import lightningdit_digits
    from repa_digits import MODEL_CONFIG, TRAIN_FLAGS

    plain, lightning = (lightningdit_digits.train_flags(config) for config in lightningdit_digits.ARMS.values())
    assert plain == TRAIN_FLAGS
    at = lightning.index("--model-config") + 1
    assert json.loads(lightning[at]) == {**MODEL_CONFIG, "rope": True, "swiglu": True, "rms_norm": True,
                                         "qk_norm": True}
    assert lightning[:at] + lightning[at + 1:] == plain[:at] + plain[at + 1:]
