"""Sample quality metrics with the ADM evaluation suite's definitions (IS, FID, sFID, precision, recall)
and edm2's FD-DINOv2 (docs/evaluation.md). A new metric is a module here plus its row in table.METRICS."""
# re-exported: the names the package offers
from sit.metrics.dinov2 import DINOv2FeatureExtractor, DINOv2WeightsError
from sit.metrics.errors import InceptionWeightsError, MetricInputError
from sit.metrics.evaluator import Evaluator
from sit.metrics.fid_monitor import FIDMonitor
from sit.metrics.inception import (SPATIAL_DIM, InceptionFeatureExtractor, InceptionFeatures, extract_features,
                                   inception_score, to_uint8_images)
from sit.metrics.inception_weights import NUM_LOGITS, POOL_DIM, load_inception_weights, weights_fingerprint
from sit.metrics.table import DEFAULT_METRICS, METRICS, format_table, parse_metric_list
from sit.metrics.npz import npz_array_shape, open_npz_images
from sit.metrics.precision_recall import manifold_precision_recall, manifold_radii
from sit.metrics.reference import read_statistics_file, reference_fingerprint
from sit.metrics.statistics import FID_METHODS, RunningStatistics, frechet_distance
