"""Bits per dimension of 8-bit images: a dequantization noise u in [0, 1) per value ("uniform", "gaussian"
truncated to the bin, or "none": bin centres, no bound) gives the variational bound of docs/evaluation.md."""
from __future__ import annotations

import math

import torch

GAUSSIAN_STD = 0.25
NUM_LEVELS = 256


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def dequantize(images: torch.Tensor, method: str, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous model inputs of 8-bit images (N, C, H, W): x (N, C, H, W) float64 in [-1, 1] and log_q (N,),
    the dequantization noise's log-density (0 for uniform)."""
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
    """Bits/dim of 8-bit images: -(logp_x + D log(2/256) - log_q) / (D ln 2); logp_x, log_q: (N,)."""
    log_jacobian = num_dims * math.log(2.0 / NUM_LEVELS)
    return -(logp_x.double() + log_jacobian - log_q.double()) / (num_dims * math.log(2))
