"""The features of a whole .npz batch, streamed through a feature network batch by batch."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from sit.metrics.inception import SPATIAL_DIM, InceptionFeatureExtractor
from sit.metrics.inception_weights import POOL_DIM
from sit.metrics.npz import NpzBatches
from sit.metrics.statistics import RunningStatistics


@dataclass
class BatchFeatures:
    """What the metrics need from one npz: pool features and logits per image, streamed statistics."""
    pool: np.ndarray  # (N, 2048)
    logits: np.ndarray  # (N, 1008)
    pool_stats: RunningStatistics  # of the (N, 2048) pool features
    spatial_stats: RunningStatistics  # of the (N, 2023) spatial features (not kept per image)


def image_batches(path: str, batch_size: int = 64, num_workers: int = 0,
                  description: str = "") -> Iterator[torch.Tensor]:
    """An npz's `arr_0` (N, H, W, 3) uint8 as consecutive (B, 3, H, W) uint8 batches, with a progress bar."""
    loader = torch.utils.data.DataLoader(NpzBatches(path, batch_size), batch_size=None, shuffle=False,
                                         num_workers=num_workers)
    yield from tqdm(loader, desc=description or os.path.basename(path), unit="batch")


def extract_features(extractor: InceptionFeatureExtractor, path: str, batch_size: int = 64,
                     num_workers: int = 0, description: str = "") -> BatchFeatures:
    """Run the Inception over an npz's `arr_0` (N, H, W, 3) uint8 in batches (with a progress bar)."""
    pool_stats = RunningStatistics(POOL_DIM, extractor.device)
    spatial_stats = RunningStatistics(SPATIAL_DIM, extractor.device)
    pools, logits = [], []
    for images in image_batches(path, batch_size, num_workers, description):
        features = extractor(images)  # images: (B, 3, H, W) uint8
        pool_stats.update(features.pool)
        spatial_stats.update(features.spatial)
        pools.append(features.pool.cpu().numpy())
        logits.append(features.logits.cpu().numpy())
    return BatchFeatures(pool=np.concatenate(pools), logits=np.concatenate(logits),
                         pool_stats=pool_stats, spatial_stats=spatial_stats)


def embedding_statistics(embed: Callable[[torch.Tensor], torch.Tensor], dim: int, device: torch.device, path: str,
                         batch_size: int = 64, num_workers: int = 0, description: str = "") -> RunningStatistics:
    """Mean and covariance of `embed`'s (B, dim) vectors over an npz's images, streamed (none kept)."""
    statistics = RunningStatistics(dim, device)
    for images in image_batches(path, batch_size, num_workers, description):
        statistics.update(embed(images))  # images: (B, 3, H, W) uint8
    return statistics
