"""The SiT family: checkpoint-compatible parameter names/shapes, forward shapes, guidance, configs."""
import json
import os

import pytest
import torch

import models

SHAPES_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "reference_state_dict_shapes.json")
REFERENCE = json.load(open(SHAPES_FIXTURE))["models"]


def tiny_sit(**overrides) -> models.SiT:
    config = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    config.update(overrides)
    return models.SiT(**config)


def randomize(model: models.SiT, seed: int = 0) -> models.SiT:
    """Non-zero weights everywhere (the zero-initialised output layers would hide differences)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


ORIGINAL_NAMES = {f"SiT-{size}/{patch}" for size in ("S", "B", "L", "XL") for patch in (2, 4, 8)}


def test_the_original_twelve_model_names_and_the_patch_1_ones():
    assert len(ORIGINAL_NAMES) == 12
    patch_1 = {"SiT-XL/1", "SiT-L/1", "SiT-B/1", "LightningDiT-XL/1", "LightningDiT-B/1"}  # docs/backbones.md
    assert set(models.SiT_models) == ORIGINAL_NAMES | patch_1


def test_reference_has_all_24_pairs():
    assert len(REFERENCE) == 24
    assert {key.split("@")[0] for key in REFERENCE} == ORIGINAL_NAMES


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_state_dict_names_and_shapes(key):
    name, image_size = key.split("@")
    with torch.device("meta"):
        model = models.SiT_models[name](input_size=int(image_size) // 8)
    shapes = {param: list(tensor.shape) for param, tensor in model.state_dict().items()}
    expected = REFERENCE[key]
    assert list(shapes) == list(expected["state_dict_shapes"])  # same names, same order
    assert shapes == expected["state_dict_shapes"]
    assert sum(p.numel() for p in model.parameters()) == expected["num_params"]


def test_xl2_parameter_count_is_the_published_one():
    # SiT-XL/2 at 256: 675M parameters, as the paper and DiT report
    assert REFERENCE["SiT-XL/2@256"]["num_params"] == 675_129_632


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("in_channels,patch_size,input_size", [(4, 2, 8), (4, 4, 16), (3, 2, 8)])
def test_forward_shape(learn_sigma, in_channels, patch_size, input_size):
    model = randomize(tiny_sit(in_channels=in_channels, patch_size=patch_size, input_size=input_size,
                               learn_sigma=learn_sigma))
    x = torch.randn(3, in_channels, input_size, input_size)
    with torch.no_grad():
        out = model(x, torch.rand(3), torch.tensor([0, 5, 10]))  # 10 = the null label
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_fresh_model_outputs_zero():
    # adaLN-Zero: the output layer starts at zero, so a fresh model predicts exactly 0
    model = tiny_sit().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert torch.equal(out, torch.zeros_like(out))


def _cfg_batch(n: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    half = torch.randn(n, 4, 8, 8, generator=generator)
    x = torch.cat([half, half])
    y = torch.cat([torch.tensor([3, 7][:n]), torch.full((n,), 10)])
    return x, y


def test_forward_with_cfg_scale_one_is_conditional():
    model = randomize(tiny_sit())
    x, y = _cfg_batch()
    t = torch.full((4,), 0.3)
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, cfg_scale=1.0, guide_all_channels=True)
        conditional = model(x[:2], t[:2], y[:2])
    torch.testing.assert_close(guided[:2], conditional, rtol=1e-5, atol=1e-6)
    assert torch.equal(guided[:2], guided[2:])


def test_forward_with_cfg_formula():
    model = randomize(tiny_sit())
    x, y = _cfg_batch()
    t = torch.full((4,), 0.6)
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
        out = model(x, t, y)
    cond, uncond = out[:2], out[2:]
    expected_first3 = uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3])
    torch.testing.assert_close(guided[:2, :3], expected_first3, rtol=1e-5, atol=1e-6)
    # the 4th channel is not guided (the original's behaviour): it is the conditional output
    torch.testing.assert_close(guided[:2, 3], cond[:, 3], rtol=1e-5, atol=1e-6)


def test_forward_with_cfg_interval():
    """Inside [lo, hi] the sample is guided; outside it equals the conditional output."""
    model = randomize(tiny_sit())
    x, y = _cfg_batch()
    t_half = torch.tensor([0.2, 0.8])  # first sample outside (0.5, 0.9), second inside
    t = torch.cat([t_half, t_half])
    with torch.no_grad():
        in_interval = model.forward_with_cfg(x, t, y, cfg_scale=3.0, guide_all_channels=True, cfg_interval=(0.5, 0.9))
        everywhere = model.forward_with_cfg(x, t, y, cfg_scale=3.0, guide_all_channels=True)
        conditional = model(x[:2], t[:2], y[:2])
    torch.testing.assert_close(in_interval[0], conditional[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(in_interval[1], everywhere[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(everywhere[0], conditional[0], atol=1e-4)  # guidance does change it
    # interval ends are inclusive
    t_edge = torch.tensor([0.5, 0.9, 0.5, 0.9])
    with torch.no_grad():
        edge = model.forward_with_cfg(x, t_edge, y, cfg_scale=3.0, guide_all_channels=True, cfg_interval=(0.5, 0.9))
        edge_everywhere = model.forward_with_cfg(x, t_edge, y, cfg_scale=3.0, guide_all_channels=True)
    torch.testing.assert_close(edge, edge_everywhere, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [
    dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=True),
    dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10, learn_sigma=False),
    dict(input_size=16, patch_size=4, in_channels=4, hidden_size=64, depth=3, num_heads=1, num_classes=7, learn_sigma=True),
    dict(input_size=16, patch_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=1, learn_sigma=False),
    dict(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=2, num_heads=1, num_classes=5, learn_sigma=True,
         mlp_ratio=2.0),
])
def test_model_config_from_state_dict_round_trip(config):
    model = models.SiT(**config)
    recovered = models.model_config_from_state_dict(model.state_dict())
    # the head count is not in the shapes: for unpublished widths it is width // 64 (at least 1)
    expected = dict(model.config, num_heads=max(1, config["hidden_size"] // 64))
    assert recovered == expected
    # and a model built from it takes the weights strictly
    models.SiT(**recovered).load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("name", ["SiT-XL/2", "SiT-B/4", "SiT-S/8", "SiT-L/2"])
@pytest.mark.parametrize("input_size", [32, 64])
def test_model_config_from_published_shapes(name, input_size):
    with torch.device("meta"):
        model = models.SiT_models[name](input_size=input_size)
    recovered = models.model_config_from_state_dict(model.state_dict())
    assert recovered == model.config
    assert models.model_name_for_config(recovered) == name


def test_model_config_from_state_dict_rejects_other_dicts():
    with pytest.raises(ValueError, match="not a SiT state dict"):
        models.model_config_from_state_dict({"weight": torch.zeros(2)})


def test_model_name_for_custom_config_is_none():
    assert models.model_name_for_config(tiny_sit().config) is None


def test_compiled_tanh_gelu_equals_the_eager_one():
    """Compiled, TanhGELU evaluates x * sigmoid(2u) (faster on CPU): the same function as
    0.5 x (1 + tanh(u)), to float rounding, from far negative to far positive inputs."""
    import torch.nn.functional as F

    x = torch.linspace(-30, 30, 200_001)
    compiled = torch.compile(models.TanhGELU(), dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), F.gelu(x, approximate="tanh"), atol=2e-7, rtol=2e-6)
        assert torch.equal(models.TanhGELU()(x), F.gelu(x, approximate="tanh"))  # eager: the original's op


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_hidden_tokens_of_a_block_leave_the_output_alone(grad_checkpointing):
    """forward(..., hidden_at=k): the same output, and the tokens after block k (1-based) as REPA takes them."""
    torch.manual_seed(0)
    model = models.SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=5,
                       class_dropout_prob=0.0)  # no label dropout: train mode (checkpointing) is deterministic
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.grad_checkpointing = grad_checkpointing
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 4])
    model.train()
    plain = model(x, t, y)
    for depth in (1, 3):
        output, hidden = model(x, t, y, hidden_at=depth)
        assert torch.equal(output, plain)
        with torch.no_grad():
            tokens = model.x_embedder(x) + model.pos_embed                 # (N, T, D)
            c = model.t_embedder(t) + model.y_embedder(y, False)           # (N, D)
            for block in model.blocks[:depth]:
                tokens = block(tokens, c)
        torch.testing.assert_close(hidden, tokens, rtol=0, atol=0)
    with pytest.raises(ValueError, match="block number in 1..3"):
        model(x, t, y, hidden_at=4)
