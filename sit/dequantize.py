"""Likelihood of 8-bit images in bits per dimension, with dequantization.

An 8-bit value k in {0, ..., 255} is a bin [k, k + 1) of width one in "pixel units". A continuous
model density p on the model's scale x in [-1, 1] gives a variational bound on the discrete
probability of an image, with dequantization noise u ~ q(u) in [0, 1):

    log P(k) >= E_q[ log p_x(x(k + u)) + D log |dx/dy| - log q(u) ],   x(y) = 2 y / 256 - 1,

so |dx/dy| = 2 / 256 per dimension. Bits per dimension = -(that bound) / (D ln 2), the figure
image-likelihood papers report (uniform dequantization as in Ho et al. 2019 / Song et al. 2021).

- "uniform":  u ~ U[0, 1), log q = 0.
- "gaussian": u ~ N(1/2, GAUSSIAN_STD^2) truncated to [0, 1), log q its exact log-density.
- "none":     u = 1/2 with no bound: the density at bin centres, for comparison only.
"""
from __future__ import annotations

import math

import torch

GAUSSIAN_STD = 0.25
NUM_LEVELS = 256


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def dequantize(images: torch.Tensor, method: str, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous model inputs for 8-bit images.

    images: (N, C, H, W) uint8 (or integer-valued). Returns x: (N, C, H, W) float64 in [-1, 1]
    on the model's scale and log_q: (N,) the dequantization noise's log-density (0 for uniform).
    """
    if method not in DEQUANTIZATIONS:
        raise ValueError(f"unknown dequantization {method!r}; choose one of {', '.join(DEQUANTIZATIONS)}")
    levels = images.to(torch.float64)
    noise, log_q = DEQUANTIZATIONS[method](levels.shape, generator, levels.device)
    x = 2 * (levels + noise) / NUM_LEVELS - 1
    return x, log_q


def _bin_centres(shape: torch.Size, generator: torch.Generator | None, device: torch.device):
    """No noise: u = 1/2 (no bound; for comparison only)."""
    return torch.full(shape, 0.5, dtype=torch.float64, device=device), torch.zeros(shape[0], dtype=torch.float64, device=device)


def _uniform(shape: torch.Size, generator: torch.Generator | None, device: torch.device):
    """u ~ U[0, 1), drawn on the CPU generator; log q = 0."""
    noise = torch.rand(shape, generator=generator, dtype=torch.float64).to(device)
    return noise, torch.zeros(shape[0], dtype=torch.float64, device=device)


def _truncated_gaussian(shape: torch.Size, generator: torch.Generator | None, device: torch.device):
    """Samples of N(1/2, s^2) truncated to [0, 1) by inverting its CDF, and their summed log-density."""
    std = GAUSSIAN_STD
    low, high = _normal_cdf(torch.tensor(-0.5 / std, dtype=torch.float64)), _normal_cdf(torch.tensor(0.5 / std, dtype=torch.float64))
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64)
    uniform = low + uniform.clamp(1e-12, 1 - 1e-12) * (high - low)
    z = math.sqrt(2) * torch.erfinv(2 * uniform - 1)                       # standard normal quantile
    noise = (0.5 + std * z).clamp(0.0, 1.0 - 1e-12)
    log_density = -0.5 * z ** 2 - math.log(std * math.sqrt(2 * math.pi)) - torch.log(high - low)
    return noise.to(device), log_density.flatten(1).sum(dim=1).to(device)  # (N, D) summed to (N,)


# --dequantize choice -> (noise u: (N, C, H, W), log q(u): (N,)); drives the choices and dequantize alike.
DEQUANTIZATIONS = {"none": _bin_centres, "uniform": _uniform, "gaussian": _truncated_gaussian}


def image_bits_per_dim(logp_x: torch.Tensor, log_q: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Bits per dimension of 8-bit images from the model's log-density on the [-1, 1] scale.

    logp_x: (N,) nats on the model's scale; log_q: (N,) dequantization log-density; num_dims: D.
    """
    log_jacobian = num_dims * math.log(2.0 / NUM_LEVELS)
    return -(logp_x.double() + log_jacobian - log_q.double()) / (num_dims * math.log(2))
