"""All metrics of a sample batch against a reference batch, as evaluate.py reports them."""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch

from sit.metrics.batch_features import BatchFeatures, extract_features
from sit.metrics.inception import IS_SPLIT_SIZE, InceptionFeatureExtractor, inception_score, weights_fingerprint
from sit.metrics.precision_recall import PR_NEIGHBOURHOOD, manifold_precision_recall
from sit.metrics.reference import ReferenceStatistics, reference_statistics
from sit.metrics.statistics import frechet_distance


class Evaluator:
    """Computes the metrics of sample batches against a reference batch; builds the network lazily
    (a cached reference needs none).

    device: where the network and precision/recall run; weights_path: torch-fidelity Inception
    weights (None: the published ones, downloaded once); fid_method: a key of FID_METHODS.
    """

    def __init__(self, device: Union[str, torch.device] = "cpu", weights_path: Optional[str] = None,
                 batch_size: int = 64, num_workers: int = 0, fid_method: str = "eigh"):
        self.device = torch.device(device)
        self.fid_method = fid_method
        self.weights_path = weights_path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.extractor: Optional[InceptionFeatureExtractor] = None

    def features(self, path: str, description: str) -> BatchFeatures:
        """The features of an npz's images (N, H, W, 3), building the network on first use."""
        if self.extractor is None:
            self.extractor = InceptionFeatureExtractor(self.device, self.weights_path)
        return extract_features(self.extractor, path, self.batch_size, self.num_workers, description)

    def reference(self, ref_path: str) -> ReferenceStatistics:
        """The reference's statistics and pool features, from the cache beside it when still valid."""
        return reference_statistics(ref_path, functools.partial(weights_fingerprint, self.weights_path),
                                    functools.partial(self.features, ref_path, "reference"))

    def evaluate(self, ref_path: str, sample_path: str) -> dict:
        """All metrics of the sample batch against the reference batch: inception_score, fid, sfid,
        precision and recall (None without the reference's images), num_samples, num_reference."""
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
