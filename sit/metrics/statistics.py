"""Fréchet distance between Gaussians of features, and the streaming statistics it is computed from."""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.distributed as dist
from scipy import linalg

from sit.distributed import is_distributed
from sit.metrics.errors import MetricInputError

ArrayLike = Union[np.ndarray, torch.Tensor]


def trace_sqrt_by_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^1/2) of covariances (D, D) from the spectrum of the symmetric sigma1^1/2 sigma2
    sigma1^1/2 (that of sigma1 sigma2): real by construction, agrees with sqrtm to ~1e-12."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    root = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T  # sigma1^1/2
    product = root @ sigma2 @ root
    spectrum = np.linalg.eigvalsh((product + product.T) / 2)
    return float(np.sqrt(np.clip(spectrum, 0, None)).sum())


def trace_sqrt_by_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """tr((sigma1 sigma2)^1/2) of covariances (D, D) by scipy's sqrtm, ADM/TTUR's exact code path."""
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
    """|mu1-mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^1/2) for mu (D,), sigma (D, D); method: a key of FID_METHODS."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricInputError(f"statistics have different shapes: mu {mu1.shape} vs {mu2.shape}, "
                               f"sigma {sigma1.shape} vs {sigma2.shape}")
    if method not in FID_METHODS:
        raise ValueError(f"unknown Fréchet distance method {method!r}; choose one of {', '.join(FID_METHODS)}")
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * FID_METHODS[method](sigma1, sigma2))


class RunningStatistics:
    """Streaming mean and covariance (N-1, as np.cov) of feature vectors in float64, by Chan et al.'s update."""

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
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.running_mean.device)
        local = (count, self.running_mean, self.scatter)
        gathered = [[torch.zeros_like(tensor) for _ in range(dist.get_world_size())] for tensor in local]
        for parts, tensor in zip(gathered, local):  # counts, means, scatters of every rank
            dist.all_gather(parts, tensor)
        self.count = 0
        self.running_mean.zero_()
        self.scatter.zero_()
        for rank_count, rank_mean, rank_scatter in zip(*gathered):
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
