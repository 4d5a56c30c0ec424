"""The TF-ported FID Inception-v3 (torch-fidelity's network, weights from any file inception_weights
reads): pool_3, mixed_6/conv and logit features of an image batch, and the Inception Score."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from scipy import special

from sit.metrics.inception_weights import POOL_DIM, fetch_inception_weights, load_inception_weights
from sit.metrics.npz import image_batches
from sit.metrics.statistics import ArrayLike, RunningStatistics

SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
IS_SPLIT_SIZE = 5000


def inception_score(predictions: ArrayLike, split_size: int = IS_SPLIT_SIZE, from_logits: bool = False) -> float:
    """ADM's Inception Score: the mean over splits of `split_size` rows of exp(E_x KL(p(y|x) || p(y))).
    predictions: (N, K) probabilities (0 log 0 counts 0, where ADM gives NaN), or logits when from_logits."""
    predictions = np.asarray(predictions.detach().cpu() if torch.is_tensor(predictions) else predictions,
                             dtype=np.float64)
    if predictions.ndim != 2 or len(predictions) == 0:
        raise ValueError(f"predictions must be a non-empty (N, K) array, got shape {predictions.shape}")
    scores = []
    for start in range(0, len(predictions), split_size):
        part = predictions[start: start + split_size]
        if from_logits:
            log_probs = special.log_softmax(part, axis=1)
            probs = np.exp(log_probs)
            log_marginal = np.log(probs.mean(axis=0, keepdims=True))
            kl = (probs * (log_probs - log_marginal)).sum(axis=1)
        else:
            marginal = part.mean(axis=0, keepdims=True)
            kl = (special.xlogy(part, part) - special.xlogy(part, marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


@dataclass
class InceptionFeatures:
    """The network's three outputs for N images."""
    pool: torch.Tensor  # (N, 2048) pool_3
    spatial: torch.Tensor  # (N, 2023) mixed_6/conv[..., :7] flattened as (H, W, C)
    logits: torch.Tensor  # (N, 1008) bias-free logits pool_3 @ W


class InceptionFeatureExtractor:
    """torch-fidelity's TF-ported FID Inception-v3 with weights from any file inception_weights reads (None:
    torch-fidelity's, downloaded once); without `has_logits` the logits are zeros (no Inception Score)."""

    def __init__(self, device: Union[str, torch.device] = "cpu", weights_path: Optional[str] = None):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = fetch_inception_weights(weights_path)
        weights = load_inception_weights(self.weights_path)
        self.has_logits = weights.has_logits
        self.file_format = weights.file_format
        self.device = torch.device(device)
        buffer = io.BytesIO()  # torch-fidelity torch.loads a file: our own bytes of plain tensors
        torch.save(weights.state_dict, buffer)
        buffer.seek(0)
        self.network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=buffer).to(self.device)
        self.captured_spatial: Optional[torch.Tensor] = None
        self.network.Mixed_6d.branch1x1.register_forward_hook(self.capture_spatial)

    def capture_spatial(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        """Forward hook of Mixed_6d.branch1x1: keeps its output (N, 192, 17, 17) for the spatial features."""
        self.captured_spatial = output

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> InceptionFeatures:
        """images: (N, 3, H, W) uint8 in [0, 255], any size (resized to 299 like TensorFlow's bilinear)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        pool, logits = self.network(images.to(self.device))
        spatial = self.captured_spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # (N, 17, 17, 7)
        self.captured_spatial = None
        spatial = spatial.reshape(len(images), -1)  # (N, 17 * 17 * 7), in TF's (H, W, C) order
        return InceptionFeatures(pool=pool, spatial=spatial.float(), logits=logits)


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 as is, or floats in [-1, 1] as the sampling scripts: clamp(127.5 x + 128) to uint8."""
    if images.dtype == torch.uint8:
        return images
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)


@dataclass
class BatchFeatures:
    """What the metrics need from one npz: pool features and logits per image, streamed statistics."""
    pool: np.ndarray  # (N, 2048)
    logits: np.ndarray  # (N, 1008)
    pool_stats: RunningStatistics  # of the (N, 2048) pool features
    spatial_stats: RunningStatistics  # of the (N, 2023) spatial features (not kept per image)


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
