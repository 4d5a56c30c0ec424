"""A reference batch's statistics: ADM's precomputed mu/sigma/mu_s/sigma_s, or computed from its images
and cached beside it (ref.npz -> ref.stats.npz for the Inception, ref.dinov2.npz for DINOv2), valid
while the file and the weights stay the same."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from sit.metrics.inception import BatchFeatures
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
    def of_arrays(cls, arrays) -> "ReferenceStatistics":
        """From a mapping holding STATISTICS_KEYS and maybe "pool" (an .npz, a cache's arrays)."""
        return cls(*(arrays[key] for key in STATISTICS_KEYS), pool=arrays["pool"] if "pool" in arrays else None)


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
        return ReferenceStatistics.of_arrays(data) if set(STATISTICS_KEYS) <= set(data.files) else None


def cached_arrays(ref_path: str, kind: str, weights_id: Callable[[], str],
                  compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays of the cache ref.<kind>.npz when it was made from this file and these weights, else
    computed and cached (a failed write is a warning: the metrics still come)."""
    cache_path = stats_cache_path(ref_path, kind)
    fingerprint = reference_fingerprint(ref_path, weights_id())
    if os.path.isfile(cache_path):
        with open_npz(cache_path) as cache:
            if "fingerprint" in cache.files and str(cache["fingerprint"]) == fingerprint:
                arrays = {name: cache[name] for name in cache.files if name != "fingerprint"}
                print(f"Using cached reference statistics {cache_path}", file=sys.stderr)
                return arrays
    arrays = compute()
    try:
        save_npz_atomic(cache_path, **arrays, fingerprint=np.array(fingerprint))
        print(f"Saved reference statistics to {cache_path}", file=sys.stderr)
    except OSError as error:
        print(f"warning: could not write the reference cache {cache_path} ({error})", file=sys.stderr)
    return arrays


def reference_statistics(ref_path: str, weights_id: Callable[[], str],
                         compute_features: Callable[[], BatchFeatures]) -> ReferenceStatistics:
    """The reference's statistics and pool features: a statistics-only file as it is, else cached_arrays
    of its images' features. As ADM, statistics stored in the reference take precedence over its images'."""
    with open_npz(ref_path) as data:
        has_images = "arr_0" in data.files
    precomputed = read_statistics_file(ref_path)
    if not has_images:
        if precomputed is None:
            raise MetricInputError(f"{ref_path} holds neither images (arr_0) nor statistics (mu, sigma, mu_s, sigma_s)")
        return precomputed

    def compute() -> dict[str, np.ndarray]:
        batch = compute_features()
        arrays = dict(mu=batch.pool_stats.mean, sigma=batch.pool_stats.covariance, mu_s=batch.spatial_stats.mean,
                      sigma_s=batch.spatial_stats.covariance, pool=batch.pool)
        if precomputed is not None:
            arrays.update({key: getattr(precomputed, key) for key in STATISTICS_KEYS})
        return arrays

    return ReferenceStatistics.of_arrays(cached_arrays(ref_path, "stats", weights_id, compute))


def reference_embedding_statistics(ref_path: str, kind: str, weights_id: Callable[[], str],
                                   compute: Callable[[], RunningStatistics]) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu (D,), sigma (D, D), image count) of another network's embeddings (kind, e.g. "dinov2") of the
    reference's images, through cached_arrays; MetricInputError when the reference holds no images."""
    with open_npz(ref_path) as data:
        if "arr_0" not in data.files:
            raise MetricInputError(f"{ref_path} holds no images (arr_0): {kind} statistics need the reference images")

    def statistics() -> dict[str, np.ndarray]:
        measured = compute()
        return dict(mu=measured.mean, sigma=measured.covariance, count=np.array(measured.count))

    arrays = cached_arrays(ref_path, kind, weights_id, statistics)
    return arrays["mu"], arrays["sigma"], int(arrays["count"])
