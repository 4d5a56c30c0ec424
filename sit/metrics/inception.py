"""The TF-ported FID Inception-v3 (torch-fidelity's weights): pool_3, mixed_6/conv and logit features,
and the Inception Score of its predictions."""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from scipy import special

from sit.metrics.errors import InceptionWeightsError
from sit.metrics.statistics import ArrayLike

INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
POOL_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
IS_SPLIT_SIZE = 5000


def inception_score(predictions: ArrayLike, split_size: int = IS_SPLIT_SIZE, from_logits: bool = False) -> float:
    """ADM's Inception Score: mean over consecutive splits of `split_size` rows of exp(E_x KL(p(y|x) || p(y))).

    predictions: (N, K) class probabilities, or logits when from_logits. Zero probabilities count
    0 * log 0 = 0 (ADM would give NaN there; softmax outputs rarely underflow to exactly 0).
    """
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


def default_weights_path() -> str:
    """Where torch-fidelity's converted Inception weights are cached (the torch hub checkpoints folder)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_WEIGHTS_URL))


def fetch_inception_weights(weights_path: Optional[str] = None) -> str:
    """A local path to the Inception weights: `weights_path` if given, else the cached download
    (fetched once). Raises InceptionWeightsError with a one-line explanation when that fails."""
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise InceptionWeightsError(f"Inception weights file {weights_path!r} does not exist")
        return weights_path
    path = default_weights_path()
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, path, progress=True)  # temp file, then rename
        except Exception as error:  # network or disk errors all end the same way for the user
            raise InceptionWeightsError(
                f"could not download the Inception weights ({type(error).__name__}: {str(error)[:120]}); "
                f"fetch {INCEPTION_WEIGHTS_URL} yourself and put it at {path}, or pass --inception-weights FILE")
    return path


def weights_fingerprint(weights_path: Optional[str]) -> str:
    """An identifier of the feature network's weights, stored in reference caches."""
    if weights_path is None:
        return os.path.basename(INCEPTION_WEIGHTS_URL)  # the name carries the file's hash
    digest = hashlib.sha256()
    with open(fetch_inception_weights(weights_path), "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Randomly initialised weights for the same Inception architecture (tests and offline smoke runs).

    He-normal convolutions keep activations of order one through the ~100 layers.
    """
    from torchvision.models import inception_v3

    generator = torch.Generator().manual_seed(seed)
    # torchvision's Inception-v3 has the same parameter names and shapes as torch-fidelity's.
    state_dict = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=NUM_LOGITS).state_dict()
    for name, tensor in state_dict.items():
        if tensor.dim() == 4:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * math.sqrt(2.0 / tensor[0].numel()))
        elif name == "fc.weight":
            tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(tensor.shape[1]))
        elif name == "fc.bias":
            tensor.zero_()
    return state_dict


class InceptionFeatureExtractor:
    """The TF-ported FID Inception-v3 (torch-fidelity), returning pool, spatial and logit features.

    weights_path: a torch-fidelity weights file; None downloads the published one once.
    """

    def __init__(self, device: Union[str, torch.device] = "cpu", weights_path: Optional[str] = None):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = fetch_inception_weights(weights_path)
        try:  # checks the file holds only tensors before torch-fidelity unpickles it
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise InceptionWeightsError(f"cannot read Inception weights {path!r} ({type(error).__name__}: "
                                        f"{str(error)[:120]}); delete it to download again, or pass another file")
        self.device = torch.device(device)
        self.network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=path).to(self.device)
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
    """(N, 3, H, W) uint8 as is, or floats in [-1, 1] mapped like the sampling scripts:
    clamp(127.5 x + 128, 0, 255) truncated to uint8 (which rounds 127.5 x + 127.5)."""
    if images.dtype == torch.uint8:
        return images
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)
