"""Sample quality metrics in PyTorch with the ADM evaluation suite's definitions.

Inception Score, FID, sFID, precision and recall as openai/guided-diffusion's `evaluations/evaluator.py`
defines them, computed with the TensorFlow-ported FID Inception-v3 of torch-fidelity (its weights, or
NVlabs' TorchScript of the same TensorFlow graph mapped onto it), and edm2's FD-DINOv2:
- FID, precision and recall use the 2048 `pool_3` features;
- sFID uses the spatial features `mixed_6/conv` (Mixed_6d.branch1x1 here), first 7 channels of the
  17x17 map, flattened in TensorFlow's (H, W, C) order so the ADM files' `mu_s`/`sigma_s` apply;
- Inception Score uses softmax over the 1008 bias-free logits `pool_3 @ W` (ADM's softmax graph;
  torch-fidelity's `logits_unbiased`), in splits of 5000 images (10 splits for 50k samples);
- precision/recall use k=3 nearest-neighbour manifolds (squared Euclidean distances, `<=` test).
  Distances are computed in float32; ADM uses float16 with a float32 fallback;
- FD-DINOv2 is the Fréchet distance of DINOv2 ViT-L/14 CLS embeddings (224 px, bicubic; see dinov2).
The trace of the covariance square root comes from a symmetric eigendecomposition by default
(`sqrtm` runs ADM's scipy sqrtm path; both agree to ~1e-12 on full-rank statistics).

Each module holds one concern; a new metric is a module here plus its row in table.METRICS.
"""
# re-exported: the names the package offers
from sit.metrics.batch_features import BatchFeatures, embedding_statistics, extract_features
from sit.metrics.dinov2 import DINOv2FeatureExtractor, DINOv2WeightsError
from sit.metrics.errors import InceptionWeightsError, MetricInputError
from sit.metrics.evaluator import Evaluator
from sit.metrics.fid_monitor import FIDMonitor
from sit.metrics.inception import (SPATIAL_DIM, InceptionFeatureExtractor, InceptionFeatures, inception_score,
                                   to_uint8_images)
from sit.metrics.inception_weights import (NUM_LOGITS, POOL_DIM, InceptionWeights, load_inception_weights,
                                           random_inception_state_dict, weights_fingerprint)
from sit.metrics.table import DEFAULT_METRICS, METRICS, format_table, parse_metric_list
from sit.metrics.npz import NpzBatches, npz_array_shape, open_npz, open_npz_images, save_npz_atomic
from sit.metrics.precision_recall import manifold_precision_recall, manifold_radii, pairwise_squared_distances
from sit.metrics.reference import (ReferenceStatistics, read_statistics_file, reference_fingerprint,
                                   reference_statistics, stats_cache_path)
from sit.metrics.statistics import FID_METHODS, RunningStatistics, frechet_distance, trace_sqrt_product

