"""Improved precision and recall (Kynkäänniemi et al. 2019) with ADM's definitions."""
from __future__ import annotations

from typing import Optional

import torch

from sit.metrics.errors import MetricInputError
from sit.metrics.statistics import ArrayLike

PR_NEIGHBOURHOOD = 3


def pairwise_squared_distances(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (R, C) between rows (R, D) and cols (C, D), ADM's formula, clamped at 0."""
    row_norms = rows.square().sum(dim=1, keepdim=True)  # (R, 1)
    col_norms = cols.square().sum(dim=1).unsqueeze(0)  # (1, C)
    return (row_norms - 2 * rows @ cols.T + col_norms).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURHOOD, block_size: int = 4096) -> torch.Tensor:
    """Squared distance (N,) from each of features (N, D) to its k-th nearest neighbour (itself excluded,
    as ADM: the (k+1)-th smallest distance including the zero to itself). MetricInputError for N <= k."""
    if len(features) <= k:
        raise MetricInputError(f"precision/recall need more than k={k} feature vectors, got {len(features)}")
    radii = []
    for start in range(0, len(features), block_size):
        distances = pairwise_squared_distances(features[start: start + block_size], features)  # (B, N)
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_precision_recall(ref_features: ArrayLike, sample_features: ArrayLike, k: int = PR_NEIGHBOURHOOD,
                              block_size: int = 4096, device: Optional[torch.device] = None) -> tuple[float, float]:
    """(precision, recall) of sample features (N_sample, D) against reference features (N_ref, D): the
    fraction of samples inside the reference manifold (balls reaching each vector's k-th neighbour), and back."""
    ref = torch.as_tensor(ref_features, device=device, dtype=torch.float32)
    sample = torch.as_tensor(sample_features, device=device, dtype=torch.float32)
    ref_radii = manifold_radii(ref, k, block_size)
    sample_radii = manifold_radii(sample, k, block_size)
    ref_in_samples = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    sample_in_refs = torch.zeros(len(sample), dtype=torch.bool, device=ref.device)
    for ref_start in range(0, len(ref), block_size):
        ref_end = ref_start + block_size
        for sample_start in range(0, len(sample), block_size):
            sample_end = sample_start + block_size
            distances = pairwise_squared_distances(ref[ref_start:ref_end], sample[sample_start:sample_end])  # (R, S)
            ref_in_samples[ref_start:ref_end] |= (distances <= sample_radii[None, sample_start:sample_end]).any(dim=1)
            sample_in_refs[sample_start:sample_end] |= (distances <= ref_radii[ref_start:ref_end, None]).any(dim=0)
    return sample_in_refs.double().mean().item(), ref_in_samples.double().mean().item()
