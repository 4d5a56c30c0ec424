"""A reference batch's statistics: ADM's precomputed mu/sigma/mu_s/sigma_s, or computed from its images
and cached beside it (ref.npz -> ref.stats.npz for the Inception, ref.dinov2.npz for DINOv2), valid
while the file and the weights stay the same."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from sit.metrics.batch_features import BatchFeatures
from sit.metrics.errors import MetricInputError
from sit.metrics.npz import open_npz, save_npz_atomic
from sit.metrics.statistics import RunningStatistics

CACHE_VERSION = 1
STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclass
class ReferenceStatistics:
    """Gaussian statistics of the pool and spatial features, and the pool features when known."""
    mu: np.ndarray  # (2048,)
    sigma: np.ndarray  # (2048, 2048)
    mu_s: np.ndarray  # (2023,)
    sigma_s: np.ndarray  # (2023, 2023)
    pool: Optional[np.ndarray]  # (N, 2048) for precision/recall; None when only statistics are known

    @classmethod
    def of_features(cls, batch: BatchFeatures) -> "ReferenceStatistics":
        """The statistics of a batch's features, with its pool features."""
        return cls(mu=batch.pool_stats.mean, sigma=batch.pool_stats.covariance, mu_s=batch.spatial_stats.mean,
                   sigma_s=batch.spatial_stats.covariance, pool=batch.pool)


def stats_cache_path(ref_path: str, kind: str = "stats") -> str:
    """ref.npz -> ref.stats.npz (the Inception's statistics), or ref.<kind>.npz (e.g. dinov2)."""
    root, _ = os.path.splitext(ref_path)
    return f"{root}.{kind}.npz"


def reference_fingerprint(ref_path: str, weights_id: str) -> str:
    """What a cache must have been made from: this cache format, the file (name, size, time), the weights."""
    stat = os.stat(ref_path)
    return f"v{CACHE_VERSION}|{os.path.basename(ref_path)}|{stat.st_size}|{stat.st_mtime_ns}|{weights_id}"


def read_statistics_file(path: str) -> Optional[ReferenceStatistics]:
    """Precomputed statistics in an npz (ADM's mu/sigma/mu_s/sigma_s, or our cache), or None."""
    with open_npz(path) as data:
        if not set(STATISTICS_KEYS) <= set(data.files):
            return None
        pool = data["pool"] if "pool" in data.files else None
        return ReferenceStatistics(mu=data["mu"], sigma=data["sigma"], mu_s=data["mu_s"], sigma_s=data["sigma_s"],
                                   pool=pool)


def read_cache(cache_path: str, fingerprint: str) -> Optional[dict[str, np.ndarray]]:
    """The cached arrays when the cache exists and was made from `fingerprint`, else None."""
    if not os.path.isfile(cache_path):
        return None
    with open_npz(cache_path) as cache:
        if "fingerprint" not in cache.files or str(cache["fingerprint"]) != fingerprint:
            return None
        arrays = {name: cache[name] for name in cache.files if name != "fingerprint"}
    print(f"Using cached reference statistics {cache_path}", file=sys.stderr)
    return arrays


def write_cache(cache_path: str, arrays: dict[str, np.ndarray], fingerprint: str) -> None:
    """Cache the arrays (statistics, pool features); a failed write is a warning (the metrics still come)."""
    try:
        save_npz_atomic(cache_path, **arrays, fingerprint=np.array(fingerprint))
        print(f"Saved reference statistics to {cache_path}", file=sys.stderr)
    except OSError as error:
        print(f"warning: could not write the reference cache {cache_path} ({error})", file=sys.stderr)


def reference_statistics(ref_path: str, weights_id: Callable[[], str],
                         compute_features: Callable[[], BatchFeatures]) -> ReferenceStatistics:
    """The reference's statistics and pool features: a statistics-only file as it is, else from the
    cache beside it when still valid, else computed (compute_features) and cached.

    ADM's rule: statistics stored in the reference take precedence over those of its images (whose
    pool features still serve precision/recall). weights_id identifies the network (for the cache).
    """
    with open_npz(ref_path) as data:
        has_images = "arr_0" in data.files
    precomputed = read_statistics_file(ref_path)
    if not has_images:
        if precomputed is None:
            raise MetricInputError(f"{ref_path} holds neither images (arr_0) nor statistics (mu, sigma, mu_s, sigma_s)")
        return precomputed
    cache_path = stats_cache_path(ref_path)
    fingerprint = reference_fingerprint(ref_path, weights_id())
    cached = read_cache(cache_path, fingerprint)
    if cached is not None:
        return ReferenceStatistics(mu=cached["mu"], sigma=cached["sigma"], mu_s=cached["mu_s"],
                                   sigma_s=cached["sigma_s"], pool=cached.get("pool"))
    reference = ReferenceStatistics.of_features(compute_features())
    if precomputed is not None:
        reference.mu, reference.sigma = precomputed.mu, precomputed.sigma
        reference.mu_s, reference.sigma_s = precomputed.mu_s, precomputed.sigma_s
    write_cache(cache_path, dict(mu=reference.mu, sigma=reference.sigma, mu_s=reference.mu_s,
                                 sigma_s=reference.sigma_s, pool=reference.pool), fingerprint)
    return reference


def reference_embedding_statistics(ref_path: str, kind: str, weights_id: Callable[[], str],
                                   compute: Callable[[], RunningStatistics]) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu (D,), sigma (D, D), image count) of another network's embeddings (kind, e.g. "dinov2") of the
    reference's images, from the cache ref.<kind>.npz when still valid, else computed and cached.

    MetricInputError when the reference holds no images (ADM's statistics are the Inception's only).
    """
    with open_npz(ref_path) as data:
        if "arr_0" not in data.files:
            raise MetricInputError(f"{ref_path} holds no images (arr_0): {kind} statistics need the reference images")
    cache_path = stats_cache_path(ref_path, kind)
    fingerprint = reference_fingerprint(ref_path, weights_id())
    cached = read_cache(cache_path, fingerprint)
    if cached is not None:
        return cached["mu"], cached["sigma"], int(cached["count"])
    statistics = compute()
    mu, sigma = statistics.mean, statistics.covariance
    write_cache(cache_path, dict(mu=mu, sigma=sigma, count=np.array(statistics.count)), fingerprint)
    return mu, sigma, statistics.count
