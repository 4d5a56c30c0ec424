"""Fréchet distance between Gaussians of features, and the streaming statistics it is computed from.

Too few vectors or statistics of different shapes come from the files the user named: MetricInputError.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.distributed as dist
from scipy import linalg

from sit.distributed import is_distributed
from sit.metrics.errors import MetricInputError

ArrayLike = Union[np.ndarray, torch.Tensor]


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str = "eigh") -> float:
    """tr((sigma1 sigma2)^1/2) for covariances (D, D), by one of FID_METHODS:

    "eigh": the eigenvalues of the symmetric sigma1^1/2 sigma2 sigma1^1/2, which has the same
    spectrum as sigma1 sigma2 (several times faster than sqrtm and real by construction; agrees
    with "sqrtm" to ~1e-12 relative on full-rank statistics). "sqrtm": ADM/TTUR's exact code path
    (scipy sqrtm; eps on the diagonal when the product is singular; MetricInputError when the square
    root has a sizeable imaginary part). An unknown method is a ValueError.
    """
    if method not in FID_METHODS:
        raise ValueError(f"unknown Fréchet distance method {method!r}; choose one of {', '.join(FID_METHODS)}")
    return FID_METHODS[method](sigma1, sigma2)


def trace_sqrt_by_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^1/2) of covariances (D, D) from the spectrum of sigma1^1/2 sigma2 sigma1^1/2."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    root = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T  # sigma1^1/2
    product = root @ sigma2 @ root
    spectrum = np.linalg.eigvalsh((product + product.T) / 2)
    return float(np.sqrt(np.clip(spectrum, 0, None)).sum())


def trace_sqrt_by_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """tr((sigma1 sigma2)^1/2) of covariances (D, D) by scipy's sqrtm, as ADM/TTUR compute it."""
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricInputError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} "
                                   f"in the covariance square root (too few samples for the feature dimension?)")
        covmean = covmean.real
    return float(np.trace(covmean))


# --fid-method choice -> tr((sigma1 sigma2)^1/2); drives the argparse choices and the dispatch alike.
FID_METHODS = {"eigh": trace_sqrt_by_eigh, "sqrtm": trace_sqrt_by_sqrtm}


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: str = "eigh") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): |mu1-mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^1/2).

    mu: (D,), sigma: (D, D); method: see trace_sqrt_product. Statistics of different shapes: MetricInputError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricInputError(f"statistics have different shapes: mu {mu1.shape} vs {mu2.shape}, "
                               f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2, method))


class RunningStatistics:
    """Streaming mean and covariance of feature vectors in float64 (Chan et al.'s pairwise update),
    so callers never hold all features. Covariance uses N-1, like np.cov (and ADM)."""

    def __init__(self, dim: int, device: Union[str, torch.device] = "cpu"):
        self.count = 0
        self.running_mean = torch.zeros(dim, dtype=torch.float64, device=device)  # running mean, (D,)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # sum of centred outer products, (D, D)

    def merge(self, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        """Fold in another group's count, mean (D,) and scatter (D, D)."""
        if count == 0:
            return
        total = self.count + count
        delta = mean.to(self.running_mean) - self.running_mean
        self.running_mean += delta * (count / total)
        self.scatter += scatter.to(self.scatter) + torch.outer(delta, delta) * (self.count * count / total)
        self.count = total

    def update(self, features: ArrayLike) -> None:
        """Add a batch of features (N, D)."""
        batch = torch.as_tensor(features).to(self.running_mean.device, torch.float64)
        if batch.ndim != 2 or batch.shape[1] != self.running_mean.shape[0]:
            raise ValueError(f"expected features of shape (N, {self.running_mean.shape[0]}), got {tuple(batch.shape)}")
        batch_mean = batch.mean(dim=0)
        centred = batch - batch_mean  # (N, D)
        self.merge(len(batch), batch_mean, centred.T @ centred)

    def all_gather(self) -> None:
        """Replace this process's statistics by those of all processes (no-op without torch.distributed)."""
        if not is_distributed() or dist.get_world_size() == 1:
            return
        world_size = dist.get_world_size()
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.running_mean.device)
        counts = [torch.zeros_like(count) for _ in range(world_size)]
        means = [torch.zeros_like(self.running_mean) for _ in range(world_size)]
        scatters = [torch.zeros_like(self.scatter) for _ in range(world_size)]
        dist.all_gather(counts, count)
        dist.all_gather(means, self.running_mean)
        dist.all_gather(scatters, self.scatter)
        self.count = 0
        self.running_mean.zero_()
        self.scatter.zero_()
        for rank_count, rank_mean, rank_scatter in zip(counts, means, scatters):
            self.merge(int(rank_count.item()), rank_mean, rank_scatter)

    @property
    def mean(self) -> np.ndarray:
        """The mean (D,) of every vector seen, float64."""
        return self.running_mean.cpu().numpy()

    @property
    def covariance(self) -> np.ndarray:
        """The covariance (D, D) of every vector seen, float64 (N-1); MetricInputError below 2 vectors."""
        if self.count < 2:
            raise MetricInputError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        return (self.scatter / (self.count - 1)).cpu().numpy()
