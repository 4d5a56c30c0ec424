"""Dequantization and bits/dim of 8-bit images against closed forms."""
import math

import pytest
import torch

from sit.dequantize import GAUSSIAN_STD, NUM_LEVELS, dequantize, image_bits_per_dim


def normal_pdf(z: float) -> float:
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def gaussian_logp(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample. x: (N, ...) -> (N,)."""
    z = (x - mean) / std
    return (-0.5 * z ** 2 - math.log(std * math.sqrt(2 * math.pi))).flatten(1).sum(dim=1)


@pytest.fixture
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (64, 3, 4, 4), generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("method", ["none", "uniform", "gaussian"])
def test_dequantized_values_stay_in_their_bin(images, method):
    x, log_q = dequantize(images, method, torch.Generator().manual_seed(1))
    assert x.dtype == torch.float64 and x.shape == images.shape and log_q.shape == (64,)
    bins = torch.floor((x + 1) * NUM_LEVELS / 2)
    assert torch.equal(bins.to(torch.uint8), images)


def test_uniform_noise_is_uniform(images):
    x, log_q = dequantize(images.repeat(50, 1, 1, 1), "uniform", torch.Generator().manual_seed(2))
    noise = (x + 1) * NUM_LEVELS / 2 - images.repeat(50, 1, 1, 1).double()
    assert abs(noise.mean().item() - 0.5) < 0.005
    assert abs(noise.var().item() - 1 / 12) < 0.002
    assert torch.equal(log_q, torch.zeros_like(log_q))


def test_gaussian_log_density_matches_the_truncated_normal_entropy():
    """E[-log q] over samples equals the closed-form entropy of N(1/2, s^2) truncated to [0, 1)."""
    images = torch.zeros(4000, 1, 1, 1, dtype=torch.uint8)
    _, log_q = dequantize(images, "gaussian", torch.Generator().manual_seed(3))
    s = GAUSSIAN_STD
    alpha, beta = -0.5 / s, 0.5 / s
    mass = 0.5 * (math.erf(beta / math.sqrt(2)) - math.erf(alpha / math.sqrt(2)))
    entropy = math.log(s * math.sqrt(2 * math.pi * math.e) * mass) + (alpha * normal_pdf(alpha) - beta * normal_pdf(beta)) / (2 * mass)
    assert abs((-log_q).mean().item() - entropy) < 0.01


def test_uniform_bits_per_dim_equal_the_closed_form(images):
    """Model N(mu, s^2) on the [-1, 1] scale: E_u[log p] has a closed form per pixel bin."""
    mean, std = 0.1, 0.6
    num_dims = images[0].numel()
    repeats = 400
    x, log_q = dequantize(images.repeat(repeats, 1, 1, 1), "uniform", torch.Generator().manual_seed(4))
    bpd = image_bits_per_dim(gaussian_logp(x, mean, std), log_q, num_dims).view(repeats, -1).mean(dim=0)
    centres = 2 * (images.double() + 0.5) / NUM_LEVELS - 1
    bin_var = (2 / NUM_LEVELS) ** 2 / 12
    expected_logp = (-0.5 * ((centres - mean) ** 2 + bin_var) / std ** 2 - math.log(std * math.sqrt(2 * math.pi))).flatten(1).sum(dim=1)
    expected_bpd = -(expected_logp + num_dims * math.log(2 / NUM_LEVELS)) / (num_dims * math.log(2))
    torch.testing.assert_close(bpd, expected_bpd, rtol=1e-3, atol=0)


def test_a_uniform_model_over_256_levels_costs_eight_bits():
    """p uniform on [-1, 1) (density 1/2 per dimension) is 8 bits per dimension exactly."""
    images = torch.randint(0, 256, (5, 3, 2, 2), dtype=torch.uint8)
    x, log_q = dequantize(images, "uniform")
    num_dims = images[0].numel()
    logp = torch.full((5,), num_dims * math.log(0.5), dtype=torch.float64)
    torch.testing.assert_close(image_bits_per_dim(logp, log_q, num_dims), torch.full((5,), 8.0, dtype=torch.float64))


def test_unknown_method_is_refused(images):
    with pytest.raises(ValueError, match="choose one of none, uniform, gaussian"):
        dequantize(images, "logistic")
