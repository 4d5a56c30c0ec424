"""Sample quality metrics in PyTorch with the ADM evaluation suite's definitions.

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples/<folder>.npz [--json metrics.json]

Inception Score, FID, sFID, precision and recall as openai/guided-diffusion's `evaluations/evaluator.py`
defines them, computed with the TensorFlow-ported FID Inception-v3 of torch-fidelity:
- FID, precision and recall use the 2048 `pool_3` features;
- sFID uses the spatial features `mixed_6/conv` (Mixed_6d.branch1x1 here), first 7 channels of the
  17x17 map, flattened in TensorFlow's (H, W, C) order so the ADM files' `mu_s`/`sigma_s` apply;
- Inception Score uses softmax over the 1008 bias-free logits `pool_3 @ W` (ADM's softmax graph;
  torch-fidelity's `logits_unbiased`), in splits of 5000 images (10 splits for 50k samples);
- precision/recall use k=3 nearest-neighbour manifolds (squared Euclidean distances, `<=` test).
  Distances are computed in float32; ADM uses float16 with a float32 fallback.
The trace of the covariance square root comes from a symmetric eigendecomposition by default
(`--fid-method sqrtm` runs ADM's scipy sqrtm path; both agree to ~1e-12 on full-rank statistics).

Reference batches: `arr_0` (N, H, W, 3) uint8 images, optionally with precomputed `mu`, `sigma`,
`mu_s`, `sigma_s` (which then take precedence for FID/sFID, as in ADM). Reference statistics and
pool features are cached beside the file (ref.npz -> ref.stats.npz). With no sample batch the
script only writes that cache, which `FIDMonitor` (FID during training) can read.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from scipy import linalg, special
from tqdm import tqdm

from train_utils import atomic_write, non_negative_int, positive_int

INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
POOL_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURHOOD = 3
CACHE_VERSION = 1

ArrayLike = Union[np.ndarray, torch.Tensor]


class InceptionWeightsError(RuntimeError):
    """The Inception weights could not be fetched or read."""


#################################################################################
#                                   The math                                    #
#################################################################################

def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str = "eigh") -> float:
    """tr((sigma1 sigma2)^1/2) for covariances (D, D), by one of FID_METHODS:

    "eigh": the eigenvalues of the symmetric sigma1^1/2 sigma2 sigma1^1/2, which has the same
    spectrum as sigma1 sigma2 (several times faster than sqrtm and real by construction; agrees
    with "sqrtm" to ~1e-12 relative on full-rank statistics). "sqrtm": ADM/TTUR's exact code path
    (scipy sqrtm; eps on the diagonal when the product is singular; ValueError when the square
    root has a sizeable imaginary part).
    """
    if method not in FID_METHODS:
        raise ValueError(f"unknown Fréchet distance method {method!r}; choose one of {', '.join(FID_METHODS)}")
    return FID_METHODS[method](sigma1, sigma2)


def trace_sqrt_by_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    root = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T  # sigma1^1/2
    product = root @ sigma2 @ root
    spectrum = np.linalg.eigvalsh((product + product.T) / 2)
    return float(np.sqrt(np.clip(spectrum, 0, None)).sum())


def trace_sqrt_by_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} "
                             f"in the covariance square root (too few samples for the feature dimension?)")
        covmean = covmean.real
    return float(np.trace(covmean))


# --fid-method choice -> tr((sigma1 sigma2)^1/2); drives the argparse choices and the dispatch alike.
FID_METHODS = {"eigh": trace_sqrt_by_eigh, "sqrtm": trace_sqrt_by_sqrtm}


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: str = "eigh") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): |mu1-mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^1/2).

    mu: (D,), sigma: (D, D); method: see trace_sqrt_product.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics have different shapes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2, method))


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


def pairwise_squared_distances(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (R, C) between rows (R, D) and cols (C, D), ADM's formula, clamped at 0."""
    row_norms = rows.square().sum(dim=1, keepdim=True)  # (R, 1)
    col_norms = cols.square().sum(dim=1).unsqueeze(0)  # (1, C)
    return (row_norms - 2 * rows @ cols.T + col_norms).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURHOOD, block_size: int = 4096) -> torch.Tensor:
    """Squared distance (N,) from each of features (N, D) to its k-th nearest neighbour (itself excluded,
    as ADM: the (k+1)-th smallest distance including the zero to itself)."""
    if len(features) <= k:
        raise ValueError(f"precision/recall need more than k={k} feature vectors, got {len(features)}")
    radii = []
    for start in range(0, len(features), block_size):
        distances = pairwise_squared_distances(features[start: start + block_size], features)  # (B, N)
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_precision_recall(ref_features: ArrayLike, sample_features: ArrayLike, k: int = PR_NEIGHBOURHOOD,
                              block_size: int = 4096, device: Optional[torch.device] = None) -> tuple[float, float]:
    """ADM's improved precision and recall (Kynkäänniemi et al. 2019) of sample vs reference features.

    ref_features: (N_ref, D), sample_features: (N_sample, D).
    Precision: the fraction of samples inside the reference manifold (the union of balls around each
    reference vector reaching its k-th neighbour); recall: the fraction of references inside the
    sample manifold.
    """
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


class RunningStatistics:
    """Streaming mean and covariance of feature vectors in float64 (Chan et al.'s pairwise update),
    so callers never hold all features. Covariance uses N-1, like np.cov (and ADM)."""

    def __init__(self, dim: int, device: Union[str, torch.device] = "cpu"):
        self.count = 0
        self.running_mean = torch.zeros(dim, dtype=torch.float64, device=device)  # running mean, (D,)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # sum of centred outer products, (D, D)

    def merge(self, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        """Fold in another group's count, mean (D,) and scatter (D, D)."""
        if count == 0:
            return
        total = self.count + count
        delta = mean.to(self.running_mean) - self.running_mean
        self.running_mean += delta * (count / total)
        self.scatter += scatter.to(self.scatter) + torch.outer(delta, delta) * (self.count * count / total)
        self.count = total

    def update(self, features: ArrayLike) -> None:
        """Add a batch of features (N, D)."""
        batch = torch.as_tensor(features).to(self.running_mean.device, torch.float64)
        if batch.ndim != 2 or batch.shape[1] != self.running_mean.shape[0]:
            raise ValueError(f"expected features of shape (N, {self.running_mean.shape[0]}), got {tuple(batch.shape)}")
        batch_mean = batch.mean(dim=0)
        centred = batch - batch_mean  # (N, D)
        self.merge(len(batch), batch_mean, centred.T @ centred)

    def all_gather(self) -> None:
        """Replace this process's statistics by those of all processes (no-op without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world_size = dist.get_world_size()
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.running_mean.device)
        counts = [torch.zeros_like(count) for _ in range(world_size)]
        means = [torch.zeros_like(self.running_mean) for _ in range(world_size)]
        scatters = [torch.zeros_like(self.scatter) for _ in range(world_size)]
        dist.all_gather(counts, count)
        dist.all_gather(means, self.running_mean)
        dist.all_gather(scatters, self.scatter)
        self.count = 0
        self.running_mean.zero_()
        self.scatter.zero_()
        for rank_count, rank_mean, rank_scatter in zip(counts, means, scatters):
            self.merge(int(rank_count.item()), rank_mean, rank_scatter)

    @property
    def mean(self) -> np.ndarray:
        return self.running_mean.cpu().numpy()

    @property
    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        return (self.scatter / (self.count - 1)).cpu().numpy()


#################################################################################
#                                Feature network                                #
#################################################################################

@dataclass
class InceptionFeatures:
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


#################################################################################
#                                  npz batches                                  #
#################################################################################

def open_npz_images(path: str, key: str = "arr_0") -> np.ndarray:
    """The (N, H, W, 3) uint8 images of an .npz, memory-mapped when stored uncompressed (np.savez),
    else loaded into memory. Raises ValueError for anything else."""
    with zipfile.ZipFile(path) as archive:
        member = f"{key}.npy"
        if member not in archive.namelist():
            raise ValueError(f"{path} has no {key!r} array (it holds {', '.join(archive.namelist())})")
        info = archive.getinfo(member)
        if info.compress_type == zipfile.ZIP_STORED:
            with archive.open(info) as stream:
                version = np.lib.format.read_magic(stream)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = read_header(stream)
                npy_header_size = stream.tell()
            with open(path, "rb") as raw:
                raw.seek(info.header_offset)
                local_header = raw.read(30)  # zip local file header: name and extra lengths at bytes 26-30
                name_length, extra_length = np.frombuffer(local_header[26:30], dtype="<u2")
            offset = info.header_offset + 30 + int(name_length) + int(extra_length) + npy_header_size
            images = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                               order="F" if fortran_order else "C")
        else:
            images = np.load(path)[key]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: {key} must be uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


class NpzBatches(torch.utils.data.Dataset):
    """Consecutive batches of an npz's images as (B, 3, H, W) uint8 tensors; opens the file lazily
    in each DataLoader worker."""

    def __init__(self, path: str, batch_size: int):
        self.path = path
        self.batch_size = batch_size
        self.num_images = len(open_npz_images(path))
        self.images: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.images is None:
            self.images = open_npz_images(self.path)
        batch = np.array(self.images[index * self.batch_size: (index + 1) * self.batch_size])  # a writable copy
        return torch.from_numpy(batch).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)


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


#################################################################################
#                             FID during training                               #
#################################################################################

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


#################################################################################
#                                    Script                                     #
#################################################################################

METRIC_NAMES = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID",
                "precision": "Precision", "recall": "Recall"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="IS, FID, sFID, precision and recall (ADM definitions) of a "
                                                 "sample batch against a reference batch.")
    parser.add_argument("ref_batch", help="reference .npz: arr_0 (N, H, W, 3) uint8 and/or mu, sigma, mu_s, sigma_s")
    parser.add_argument("sample_batch", nargs="?", default=None,
                        help="sample .npz with arr_0 (N, H, W, 3) uint8; omit to only cache the reference statistics")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader workers reading the npz")
    parser.add_argument("--fid-method", choices=list(FID_METHODS), default="eigh",
                        help="how tr((s1 s2)^1/2) is computed: eigh (fast, symmetric) or sqrtm (ADM's exact code path)")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--inception-weights", default=None,
                        help="local torch-fidelity Inception weights file (default: download once to the torch hub cache)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    for path in (args.ref_batch, args.sample_batch):
        if path is not None and not os.path.isfile(path):
            parser.error(f"no such file: {path}")
    return args


def format_table(metrics: dict) -> str:
    lines = [f"{'Metric':<16} {'Value':>12}"]
    for key, name in METRIC_NAMES.items():
        value = metrics[key]
        lines.append(f"{name:<16} {'n/a' if value is None else format(value, '12.4f'):>12}")
    return "\n".join(lines)


def dump_json(data: dict, path: str) -> None:
    with open(path, "w") as file:
        json.dump(data, file, indent=2)


def write_json(path: str, metrics: dict) -> None:
    """The metrics as JSON, written to a temporary name and renamed."""
    atomic_write(path, functools.partial(dump_json, metrics), suffix=".json")


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # full float32, like the TensorFlow reference
    torch.backends.cudnn.allow_tf32 = False
    evaluator = Evaluator(args.device, args.inception_weights, args.batch_size, args.num_workers, args.fid_method)
    try:
        if args.sample_batch is None:
            evaluator.reference(args.ref_batch)
            return
        metrics = evaluator.evaluate(args.ref_batch, args.sample_batch)
    except (InceptionWeightsError, ValueError, zipfile.BadZipFile, OSError) as error:
        raise SystemExit(f"error: {error}")
    print(format_table(metrics))
    if args.json is not None:
        write_json(args.json, {**metrics, "ref_batch": args.ref_batch, "sample_batch": args.sample_batch,
                               "fid_method": args.fid_method})


if __name__ == "__main__":
    main()
