"""The requested metrics of a sample batch against a reference batch, and the evaluator's settings."""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import numpy as np
import torch

from sit.files import file_fingerprint, sha256_file
from sit.metrics.dinov2 import DINOV2_RESIZE, DINOv2FeatureExtractor, fetch_dinov2_weights
from sit.metrics.inception import (IS_SPLIT_SIZE, SPATIAL_CHANNELS, BatchFeatures, InceptionFeatureExtractor,
                                   extract_features, inception_score)
from sit.metrics.inception_weights import WHICH_FILES, weights_fingerprint
from sit.metrics.npz import image_batches, npz_array_shape
from sit.metrics.precision_recall import PR_NEIGHBOURHOOD, manifold_precision_recall
from sit.metrics.reference import ReferenceStatistics, reference_embedding_statistics, reference_statistics
from sit.metrics.statistics import RunningStatistics, frechet_distance
from sit.metrics.table import DEFAULT_METRICS, METRICS
from sit.record import package_versions

INCEPTION_RESIZE = "TF1 bilinear (align_corners=False) to 299x299, then (x - 128) / 128 (torch-fidelity)"


class Evaluator:
    """The requested metrics (keys of METRICS) of sample batches against a reference batch; each feature
    network is built on first use. weights_path/dinov2_weights: None downloads the default weights."""

    def __init__(self, device: Union[str, torch.device] = "cpu", weights_path: Optional[str] = None,
                 batch_size: int = 64, num_workers: int = 0, fid_method: str = "eigh",
                 metrics: Sequence[str] = DEFAULT_METRICS, dinov2_weights: Optional[str] = None):
        self.device = torch.device(device)
        self.fid_method = fid_method
        self.weights_path = weights_path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.metrics = tuple(metrics)
        self.dinov2_weights = dinov2_weights
        self.extractor: Optional[InceptionFeatureExtractor] = None
        self.dinov2: Optional[DINOv2FeatureExtractor] = None

    def needs(self, network: str) -> bool:
        """Whether any requested metric is computed from this network's features."""
        return any(METRICS[name].network == network for name in self.metrics)

    def features(self, path: str, description: str) -> BatchFeatures:
        """The Inception features of an npz's images (N, H, W, 3), building the network on first use."""
        if self.extractor is None:
            self.extractor = InceptionFeatureExtractor(self.device, self.weights_path)
        return extract_features(self.extractor, path, self.batch_size, self.num_workers, description)

    def reference(self, ref_path: str) -> ReferenceStatistics:
        """The reference's statistics and pool features, from the cache beside it when still valid."""
        return reference_statistics(ref_path, functools.partial(weights_fingerprint, self.weights_path),
                                    functools.partial(self.features, ref_path, "reference"))

    def dinov2_statistics(self, path: str, description: str) -> RunningStatistics:
        """Streamed mean and covariance of the DINOv2 embeddings of an npz's images (network built on first use)."""
        if self.dinov2 is None:
            self.dinov2 = DINOv2FeatureExtractor(self.device, self.dinov2_weights)
        statistics = RunningStatistics(self.dinov2.dim, self.device)
        for images in image_batches(path, self.batch_size, self.num_workers, description):
            statistics.update(self.dinov2(images))  # images: (B, 3, H, W) uint8
        return statistics

    def dinov2_reference(self, ref_path: str) -> tuple[np.ndarray, np.ndarray, int]:
        """(mu (D,), sigma (D, D), count) of the reference's DINOv2 embeddings, from ref.dinov2.npz when valid."""
        return reference_embedding_statistics(
            ref_path, "dinov2", lambda: file_fingerprint(fetch_dinov2_weights(self.dinov2_weights)),
            functools.partial(self.dinov2_statistics, ref_path, "reference (DINOv2)"))

    def cache_reference(self, ref_path: str) -> None:
        """Compute (or check) the reference's cached statistics for the requested metrics' networks."""
        if self.needs("inception"):
            self.reference(ref_path)
        if self.needs("dinov2"):
            self.dinov2_reference(ref_path)

    def evaluate(self, ref_path: str, sample_path: str) -> dict:
        """The requested metrics by METRICS' `key` (None, with the reason in result["notes"], where one
        cannot be computed), num_samples and num_reference (None for a statistics-only reference)."""
        result: dict = {"notes": {}, "num_samples": npz_array_shape(sample_path)[0], "num_reference": None}
        wanted = set(self.metrics)
        if self.needs("inception"):
            self.inception_metrics(ref_path, sample_path, wanted, result)
        if "fd_dinov2" in wanted:
            mu, sigma, count = self.dinov2_reference(ref_path)
            samples = self.dinov2_statistics(sample_path, "samples (DINOv2)")
            result["fd_dinov2"] = frechet_distance(samples.mean, samples.covariance, mu, sigma, self.fid_method)
            result["num_reference"] = count
        return result

    def inception_metrics(self, ref_path: str, sample_path: str, wanted: set, result: dict) -> None:
        """Fill `result` with the requested Inception metrics (IS, FID, sFID, precision, recall)."""
        reference = self.reference(ref_path)
        samples = self.features(sample_path, "samples")
        if "is" in wanted:
            result["inception_score"] = None
            if self.extractor.has_logits:
                result["inception_score"] = inception_score(samples.logits, IS_SPLIT_SIZE, from_logits=True)
            else:
                result["notes"]["inception_score"] = (
                    f"the Inception Score needs weights with logits; {self.extractor.weights_path} "
                    f"({self.extractor.file_format}) stops at pool_3: {WHICH_FILES}")
        if "fid" in wanted:
            result["fid"] = frechet_distance(samples.pool_stats.mean, samples.pool_stats.covariance, reference.mu,
                                             reference.sigma, self.fid_method)
        if "sfid" in wanted:
            result["sfid"] = frechet_distance(samples.spatial_stats.mean, samples.spatial_stats.covariance,
                                              reference.mu_s, reference.sigma_s, self.fid_method)
        asked = [name for name in ("precision", "recall") if name in wanted]
        if reference.pool is None:
            for name in asked:
                result[name] = None
                result["notes"][name] = (f"precision and recall need the reference images (arr_0); {ref_path} "
                                         f"holds statistics only")
            return
        if asked:
            values = manifold_precision_recall(reference.pool, samples.pool, PR_NEIGHBOURHOOD, device=self.device)
            result.update({name: dict(zip(("precision", "recall"), values))[name] for name in asked})
        result["num_reference"] = len(reference.pool)

    def settings(self, ref_path: str) -> dict:
        """What a result depends on besides the samples (reference, weights, resizes, versions); after evaluate()."""
        settings = {"metrics": list(self.metrics), "fid_method": self.fid_method,
                    "reference": {"path": ref_path, "sha256": sha256_file(ref_path)}, "inception": None,
                    "dinov2": None, "versions": package_versions()}
        if self.extractor is not None:
            settings["inception"] = {
                "weights": self.extractor.weights_path, "sha256": sha256_file(self.extractor.weights_path),
                "format": self.extractor.file_format, "has_logits": self.extractor.has_logits,
                "resize": INCEPTION_RESIZE, "is_split_size": IS_SPLIT_SIZE,
                "sfid_features": f"mixed_6/conv, first {SPATIAL_CHANNELS} channels, (H, W, C) order",
                "precision_recall_k": PR_NEIGHBOURHOOD}
        if self.dinov2 is not None:
            settings["dinov2"] = {"weights": self.dinov2.weights_path, "sha256": sha256_file(self.dinov2.weights_path),
                                  "resize": DINOV2_RESIZE}
        return settings
