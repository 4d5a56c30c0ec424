"""FID while training: images generated on every rank against reference statistics, none kept."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from sit.distributed import is_distributed
from sit.metrics.errors import MetricInputError
from sit.metrics.inception import InceptionFeatureExtractor, to_uint8_images
from sit.metrics.inception_weights import POOL_DIM
from sit.metrics.reference import read_statistics_file, stats_cache_path
from sit.metrics.statistics import RunningStatistics, frechet_distance


class FIDMonitor:
    """FID against reference statistics (an .npz with mu/sigma, else MetricInputError): update(images) on
    every rank, then compute() on every rank (collective, the same value everywhere), then reset()."""

    def __init__(self, ref_stats_path: str, device: Union[str, torch.device], weights_path: Optional[str] = None):
        reference = read_statistics_file(ref_stats_path)
        if reference is None:
            raise MetricInputError(f"{ref_stats_path} holds no mu/sigma statistics; make them once with "
                                   f"`python evaluate.py {ref_stats_path}` and pass {stats_cache_path(ref_stats_path)}")
        self.ref_mu, self.ref_sigma = reference.mu, reference.sigma  # (2048,), (2048, 2048)
        self.device = torch.device(device)
        self.extractor = InceptionFeatureExtractor(self.device, weights_path)
        self.stats = RunningStatistics(POOL_DIM, self.device)

    def reset(self) -> None:
        """Forget the images seen so far."""
        self.stats = RunningStatistics(POOL_DIM, self.device)

    def update(self, images: torch.Tensor) -> None:
        """images: (B, 3, H, W), uint8 or floats in [-1, 1]."""
        self.stats.update(self.extractor(to_uint8_images(images)).pool)

    def compute(self) -> float:
        """FID of everything seen since the last reset, over all ranks; rank 0 computes, then broadcasts."""
        self.stats.all_gather()
        distributed = is_distributed()
        fid = float("nan")
        if not distributed or dist.get_rank() == 0:
            fid = frechet_distance(self.stats.mean, self.stats.covariance, self.ref_mu, self.ref_sigma)
        if distributed:
            value = torch.tensor([fid], dtype=torch.float64, device=self.device)
            dist.broadcast(value, src=0)
            fid = value.item()
        return fid
