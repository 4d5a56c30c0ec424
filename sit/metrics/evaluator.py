"""The metrics of a sample batch against a reference batch (`Evaluator`), and FID while training (`FIDMonitor`)."""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from sit.files import atomic_write
from sit.metrics.inception import (IS_SPLIT_SIZE, POOL_DIM, SPATIAL_DIM, InceptionFeatureExtractor, inception_score,
                                   to_uint8_images, weights_fingerprint)
from sit.metrics.npz import NpzBatches
from sit.metrics.precision_recall import PR_NEIGHBOURHOOD, manifold_precision_recall
from sit.metrics.statistics import RunningStatistics, frechet_distance

CACHE_VERSION = 1


@dataclass
class BatchFeatures:
    """What the metrics need from one npz: pool features and logits per image, streamed statistics."""
    pool: np.ndarray  # (N, 2048)
    logits: np.ndarray  # (N, 1008)
    pool_stats: RunningStatistics
    spatial_stats: RunningStatistics


def extract_features(extractor: InceptionFeatureExtractor, path: str, batch_size: int = 64,
                     num_workers: int = 0, description: str = "") -> BatchFeatures:
    """Run the feature network over an npz's `arr_0` in batches (with a progress bar)."""
    loader = torch.utils.data.DataLoader(NpzBatches(path, batch_size), batch_size=None, shuffle=False,
                                         num_workers=num_workers)
    pool_stats = RunningStatistics(POOL_DIM, extractor.device)
    spatial_stats = RunningStatistics(SPATIAL_DIM, extractor.device)
    pools, logits = [], []
    for images in tqdm(loader, desc=description or os.path.basename(path), unit="batch"):
        features = extractor(images)
        pool_stats.update(features.pool)
        spatial_stats.update(features.spatial)
        pools.append(features.pool.cpu().numpy())
        logits.append(features.logits.cpu().numpy())
    return BatchFeatures(pool=np.concatenate(pools), logits=np.concatenate(logits),
                         pool_stats=pool_stats, spatial_stats=spatial_stats)


def save_npz_atomic(path: str, **arrays: np.ndarray) -> None:
    """np.savez to a temporary file beside `path`, then rename."""
    atomic_write(path, functools.partial(np.savez, **arrays), suffix=".npz")


#################################################################################
#                              Reference statistics                             #
#################################################################################

@dataclass
class ReferenceStatistics:
    mu: np.ndarray  # (2048,)
    sigma: np.ndarray  # (2048, 2048)
    mu_s: np.ndarray  # (2023,)
    sigma_s: np.ndarray  # (2023, 2023)
    pool: Optional[np.ndarray]  # (N, 2048) for precision/recall; None when only statistics are known


def stats_cache_path(ref_path: str) -> str:
    """ref.npz -> ref.stats.npz"""
    root, _ = os.path.splitext(ref_path)
    return root + ".stats.npz"


def reference_fingerprint(ref_path: str, weights_id: str) -> str:
    stat = os.stat(ref_path)
    return f"v{CACHE_VERSION}|{os.path.basename(ref_path)}|{stat.st_size}|{stat.st_mtime_ns}|{weights_id}"


def read_statistics_file(path: str) -> Optional[ReferenceStatistics]:
    """Precomputed statistics in an npz (ADM's mu/sigma/mu_s/sigma_s, or our cache), or None."""
    with np.load(path) as data:
        if not {"mu", "sigma", "mu_s", "sigma_s"} <= set(data.files):
            return None
        pool = data["pool"] if "pool" in data.files else None
        return ReferenceStatistics(mu=data["mu"], sigma=data["sigma"], mu_s=data["mu_s"], sigma_s=data["sigma_s"],
                                   pool=pool)


class Evaluator:
    """Computes the metrics of sample batches against a reference batch; builds the network lazily
    (a cached reference needs none)."""

    def __init__(self, device: Union[str, torch.device] = "cpu", weights_path: Optional[str] = None,
                 batch_size: int = 64, num_workers: int = 0, fid_method: str = "eigh"):
        self.device = torch.device(device)
        self.fid_method = fid_method
        self.weights_path = weights_path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.extractor: Optional[InceptionFeatureExtractor] = None

    def features(self, path: str, description: str) -> BatchFeatures:
        if self.extractor is None:
            self.extractor = InceptionFeatureExtractor(self.device, self.weights_path)
        return extract_features(self.extractor, path, self.batch_size, self.num_workers, description)

    def reference(self, ref_path: str) -> ReferenceStatistics:
        """The reference's statistics and pool features, from the cache beside it when still valid."""
        with np.load(ref_path) as data:
            has_images = "arr_0" in data.files
        precomputed = read_statistics_file(ref_path)
        if not has_images:
            if precomputed is None:
                raise ValueError(f"{ref_path} holds neither images (arr_0) nor statistics (mu, sigma, mu_s, sigma_s)")
            return precomputed
        cache_path = stats_cache_path(ref_path)
        fingerprint = reference_fingerprint(ref_path, weights_fingerprint(self.weights_path))
        if os.path.isfile(cache_path):
            with np.load(cache_path) as cache:
                cache_matches = "fingerprint" in cache.files and str(cache["fingerprint"]) == fingerprint
            if cache_matches:
                print(f"Using cached reference statistics {cache_path}", file=sys.stderr)
                return read_statistics_file(cache_path)
        batch = self.features(ref_path, "reference")
        reference = ReferenceStatistics(mu=batch.pool_stats.mean, sigma=batch.pool_stats.covariance,
                                        mu_s=batch.spatial_stats.mean, sigma_s=batch.spatial_stats.covariance,
                                        pool=batch.pool)
        if precomputed is not None:  # ADM: a reference's own statistics take precedence
            reference.mu, reference.sigma = precomputed.mu, precomputed.sigma
            reference.mu_s, reference.sigma_s = precomputed.mu_s, precomputed.sigma_s
        try:
            save_npz_atomic(cache_path, mu=reference.mu, sigma=reference.sigma, mu_s=reference.mu_s,
                            sigma_s=reference.sigma_s, pool=reference.pool, fingerprint=np.array(fingerprint))
            print(f"Saved reference statistics to {cache_path}", file=sys.stderr)
        except OSError as error:
            print(f"warning: could not write the reference cache {cache_path} ({error})", file=sys.stderr)
        return reference

    def evaluate(self, ref_path: str, sample_path: str) -> dict:
        """All metrics of the sample batch against the reference batch."""
        reference = self.reference(ref_path)
        samples = self.features(sample_path, "samples")
        metrics = {
            "inception_score": inception_score(samples.logits, IS_SPLIT_SIZE, from_logits=True),
            "fid": frechet_distance(samples.pool_stats.mean, samples.pool_stats.covariance, reference.mu,
                                    reference.sigma, self.fid_method),
            "sfid": frechet_distance(samples.spatial_stats.mean, samples.spatial_stats.covariance,
                                     reference.mu_s, reference.sigma_s, self.fid_method),
            "precision": None,
            "recall": None,
        }
        if reference.pool is not None:
            metrics["precision"], metrics["recall"] = manifold_precision_recall(
                reference.pool, samples.pool, PR_NEIGHBOURHOOD, device=self.device)
        metrics["num_samples"] = len(samples.pool)
        metrics["num_reference"] = None if reference.pool is None else len(reference.pool)
        return metrics


class FIDMonitor:
    """FID of images generated during training against reference statistics, without keeping images.

        monitor = FIDMonitor("VIRTUAL_imagenet256_labeled.npz", device)  # or ref.stats.npz
        for ...: monitor.update(images)  # every rank, (B, 3, H, W) uint8 or floats in [-1, 1]
        fid = monitor.compute()          # every rank (collective); the same value everywhere
        monitor.reset()
    """

    def __init__(self, ref_stats_path: str, device: Union[str, torch.device], weights_path: Optional[str] = None,
                 fid_method: str = "eigh"):
        self.fid_method = fid_method
        reference = read_statistics_file(ref_stats_path)
        if reference is None:
            raise ValueError(f"{ref_stats_path} holds no mu/sigma statistics; make them once with "
                             f"`python evaluate.py {ref_stats_path}` and pass {stats_cache_path(ref_stats_path)}")
        self.ref_mu, self.ref_sigma = reference.mu, reference.sigma
        self.device = torch.device(device)
        self.extractor = InceptionFeatureExtractor(self.device, weights_path)
        self.stats = RunningStatistics(POOL_DIM, self.device)

    def reset(self) -> None:
        self.stats = RunningStatistics(POOL_DIM, self.device)

    def update(self, images: torch.Tensor) -> None:
        """images: (B, 3, H, W), uint8 or floats in [-1, 1]."""
        self.stats.update(self.extractor(to_uint8_images(images)).pool)

    def compute(self) -> float:
        """FID of everything seen since the last reset, over all ranks; rank 0 computes, then broadcasts."""
        self.stats.all_gather()
        distributed = dist.is_available() and dist.is_initialized()
        fid = float("nan")
        if not distributed or dist.get_rank() == 0:
            fid = frechet_distance(self.stats.mean, self.stats.covariance, self.ref_mu, self.ref_sigma, self.fid_method)
        if distributed:
            value = torch.tensor([fid], dtype=torch.float64, device=self.device)
            dist.broadcast(value, src=0)
            fid = value.item()
        return fid
