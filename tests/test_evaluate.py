"""evaluate.py and sit.metrics: the metric math against closed forms and direct numpy/scipy computations,
the npz and cache handling with a stub feature network, and the whole pipeline with a randomly initialised
Inception of the real architecture (no downloaded weights)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import linalg

from conftest import assert_names
import evaluate
from conftest import random_inception_state_dict
from sit import metrics
from sit.errors import UsageError
from sit.metrics import (NUM_LOGITS, POOL_DIM, SPATIAL_DIM, FIDMonitor, InceptionFeatures, MetricInputError,
                         RunningStatistics, frechet_distance, inception_score, manifold_precision_recall)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def direct_frechet(mu1, sigma1, mu2, sigma2):
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean))


def random_covariance(rng, dim):
    factor = rng.standard_normal((dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


#################################################################################
#                                 Fréchet distance                              #
#################################################################################

@pytest.mark.parametrize("method", metrics.FID_METHODS)
def test_frechet_distance_matches_direct_scipy_computation(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    sigma1, sigma2 = random_covariance(rng, 16), random_covariance(rng, 16)
    expected = direct_frechet(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2, method) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_methods_agree_on_sample_statistics_and_unknown_method_is_rejected():
    rng = np.random.default_rng(13)
    first, second = rng.standard_normal((300, 40)), rng.standard_normal((250, 40)) * 1.5 + 0.2
    stats = (first.mean(0), np.cov(first, rowvar=False), second.mean(0), np.cov(second, rowvar=False))
    assert frechet_distance(*stats, "eigh") == pytest.approx(frechet_distance(*stats, "sqrtm"), rel=1e-10)
    with pytest.raises(ValueError, match="choose one of eigh, sqrtm"):
        frechet_distance(*stats, "svd")


@pytest.mark.parametrize("method", metrics.FID_METHODS)
def test_frechet_distance_of_a_set_with_itself_is_zero(method):
    features = np.random.default_rng(1).standard_normal((200, 8))
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma, method) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", metrics.FID_METHODS)
def test_frechet_distance_closed_form_for_commuting_gaussians(method):
    # Diagonal covariances: |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    variances1, variances2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    assert frechet_distance(mu1, np.diag(variances1), mu2, np.diag(variances2), method) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method", metrics.FID_METHODS)
def test_frechet_distance_closed_form_for_scaled_covariance(method):
    # sigma2 = c^2 sigma1: tr(s1 + c^2 s1 - 2 c s1) = (1 - c)^2 tr(s1)
    rng = np.random.default_rng(2)
    sigma = random_covariance(rng, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mu1 - mu2) ** 2) + (1 - 3) ** 2 * np.trace(sigma)
    assert frechet_distance(mu1, sigma, mu2, 9 * sigma, method) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


#################################################################################
#                                Inception Score                                #
#################################################################################

def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(np.full((50, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_one_hot_predictions_spread_evenly_is_the_class_count():
    probs = np.eye(7)[np.arange(70) % 7]  # 10 images per class, each certain
    assert inception_score(probs) == pytest.approx(7.0, rel=1e-12)


def test_inception_score_from_logits_equals_from_probabilities_and_splits_like_adm():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((30, 12)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert inception_score(logits, from_logits=True) == pytest.approx(inception_score(probs), rel=1e-12)
    # splits of 10 rows: the mean of the three per-split scores
    per_split = [inception_score(probs[i:i + 10]) for i in (0, 10, 20)]
    assert inception_score(probs, split_size=10) == pytest.approx(np.mean(per_split), rel=1e-12)
    # one class certain in the first half, another in the second: two splits score 1 each, one split 2
    halves = np.eye(2)[np.repeat([0, 1], 5)]
    assert inception_score(halves, split_size=5) == pytest.approx(1.0)
    assert inception_score(halves, split_size=10) == pytest.approx(2.0)


#################################################################################
#                              Precision and recall                             #
#################################################################################

def test_precision_recall_of_identical_sets_is_one():
    features = np.random.default_rng(4).standard_normal((40, 5)).astype(np.float32)
    assert manifold_precision_recall(features, features, k=3) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((30, 5)).astype(np.float32)
    assert manifold_precision_recall(ref, ref + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_hand_built_case():
    # 1-D points, k=1. Reference radii (squared distance to nearest other): 0->1, 1->1, 3->4.
    # Sample radii: 0.5->4, 2.5->4, 10->1, 11->1.
    # Samples inside the reference balls: 0.5 (0.25 <= 1), 2.5 (0.25 <= 4); 10 and 11 not: precision 2/4.
    # References inside sample balls: 0, 1 (near 0.5, radius 4), 3 (near 2.5): recall 3/3.
    ref = np.array([[0.0], [1.0], [3.0]], dtype=np.float32)
    sample = np.array([[0.5], [2.5], [10.0], [11.0]], dtype=np.float32)
    assert manifold_precision_recall(ref, sample, k=1) == (0.5, 1.0)
    # Swapping roles swaps the answers; tiny blocks give the same as one block.
    assert manifold_precision_recall(sample, ref, k=1, block_size=2) == (1.0, 0.5)


def test_precision_recall_radius_boundary_is_inclusive_and_k_excludes_self():
    ref = np.array([[0.0], [2.0], [4.0], [6.0]], dtype=np.float32)  # k=2 radii: 16, 4, 4, 16 (squared)
    radii = metrics.manifold_radii(torch.from_numpy(ref), k=2)
    assert radii.tolist() == [16.0, 4.0, 4.0, 16.0]
    sample = np.array([[10.0], [10.5], [11.0]], dtype=np.float32)  # 10 is exactly on the ball around 6
    precision, _ = manifold_precision_recall(ref, sample, k=2)
    assert precision == pytest.approx(1 / 3)


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than k=3"):
        manifold_precision_recall(np.zeros((3, 2)), np.zeros((5, 2)), k=3)


#################################################################################
#                              Streaming statistics                             #
#################################################################################

def test_running_statistics_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(6)
    features = rng.standard_normal((103, 9)) * 5 + 1000.0  # a large offset tests the centred update
    stats = RunningStatistics(9)
    for start, stop in [(0, 1), (1, 40), (40, 41), (41, 103)]:
        stats.update(features[start:stop])
    assert stats.count == 103
    np.testing.assert_allclose(stats.mean, features.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.covariance, np.cov(features, rowvar=False), rtol=1e-10)


def test_running_statistics_rejects_wrong_width_and_too_few_points():
    stats = RunningStatistics(4)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        stats.update(np.zeros((2, 5)))
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.covariance


def gather_worker(rank, world_size, init_file, result_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    features = np.random.default_rng(7).standard_normal((30, 3))
    stats = RunningStatistics(3)
    stats.update(features[:10] if rank == 0 else features[10:])  # uneven shares
    stats.all_gather()
    if rank == 1:
        np.savez(result_file, count=stats.count, mean=stats.mean, covariance=stats.covariance)
    torch.distributed.destroy_process_group()


def test_running_statistics_all_gather_across_two_processes(tmp_path):
    result_file = str(tmp_path / "result.npz")
    torch.multiprocessing.spawn(gather_worker, args=(2, str(tmp_path / "init"), result_file), nprocs=2)
    features = np.random.default_rng(7).standard_normal((30, 3))
    result = np.load(result_file)
    assert int(result["count"]) == 30
    np.testing.assert_allclose(result["mean"], features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(result["covariance"], np.cov(features, rowvar=False), rtol=1e-12)


#################################################################################
#                     npz reading and caching (stub network)                    #
#################################################################################

class StubExtractor:
    """Deterministic features from pixels; counts the images it sees."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.images_seen = 0

    def __call__(self, images):
        self.images_seen += len(images)
        pixels = images.double().flatten(1)  # (N, 3 H W)
        pool = torch.cat([pixels.mean(1, keepdim=True), pixels.std(1, keepdim=True), pixels[:, :POOL_DIM - 2]], 1)
        pool = torch.nn.functional.pad(pool, (0, POOL_DIM - pool.shape[1])).float()
        spatial = torch.nn.functional.pad(pixels, (0, SPATIAL_DIM - pixels.shape[1])).float()
        return InceptionFeatures(pool=pool, spatial=spatial, logits=pool[:, :NUM_LOGITS])


def test_open_npz_images_memory_maps_stored_and_loads_compressed(tmp_path):
    images = np.random.default_rng(8).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "stored.npz", arr_0=images, labels=np.arange(5))
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    stored = metrics.open_npz_images(str(tmp_path / "stored.npz"))
    assert isinstance(stored, np.memmap)
    np.testing.assert_array_equal(stored, images)
    np.testing.assert_array_equal(metrics.open_npz_images(str(tmp_path / "compressed.npz")), images)
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match=r"uint8 images of shape \(N, H, W, 3\)"):
        metrics.open_npz_images(str(tmp_path / "float.npz"))


def test_extract_features_streams_batches_and_workers_agree(tmp_path):
    images = np.random.default_rng(9).integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "batch.npz", arr_0=images)
    stub = StubExtractor()
    batch = metrics.extract_features(stub, str(tmp_path / "batch.npz"), batch_size=3)
    expected = stub(torch.from_numpy(images).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(batch.pool, expected.pool.numpy())
    np.testing.assert_allclose(batch.spatial_stats.mean, expected.spatial.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(batch.pool_stats.covariance, np.cov(expected.pool.double().numpy(), rowvar=False),
                               rtol=1e-9, atol=1e-9)
    with_workers = metrics.extract_features(stub, str(tmp_path / "batch.npz"), batch_size=2, num_workers=2)
    np.testing.assert_array_equal(with_workers.pool, batch.pool)


def stub_evaluator():
    evaluator = metrics.Evaluator("cpu", weights_path=None, batch_size=4)
    evaluator.extractor = StubExtractor()
    return evaluator


def test_reference_cache_is_written_reused_and_invalidated(tmp_path):
    ref_path = str(tmp_path / "ref.npz")
    np.savez(ref_path, arr_0=np.random.default_rng(10).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8))
    evaluator = stub_evaluator()
    first = evaluator.reference(ref_path)
    assert evaluator.extractor.images_seen == 6
    cache = np.load(tmp_path / "ref.stats.npz")
    np.testing.assert_allclose(cache["mu"], first.pool.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_array_equal(cache["pool"], first.pool)
    second = evaluator.reference(ref_path)  # from the cache: no images seen
    assert evaluator.extractor.images_seen == 6
    np.testing.assert_array_equal(second.sigma_s, first.sigma_s)
    os.utime(ref_path, ns=(1, 1))  # the reference changed: recompute
    evaluator.reference(ref_path)
    assert evaluator.extractor.images_seen == 12
    other_weights = metrics.reference_fingerprint(ref_path, "sha256:0123")
    assert other_weights != metrics.reference_fingerprint(ref_path, metrics.weights_fingerprint(None))


def test_adm_precomputed_statistics_take_precedence_and_stats_only_files_work(tmp_path):
    rng = np.random.default_rng(11)
    adm = {"mu": rng.standard_normal(POOL_DIM), "sigma": np.eye(POOL_DIM),
           "mu_s": rng.standard_normal(SPATIAL_DIM), "sigma_s": np.eye(SPATIAL_DIM)}
    np.savez(tmp_path / "adm.npz", arr_0=rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8), **adm)
    evaluator = stub_evaluator()
    reference = evaluator.reference(str(tmp_path / "adm.npz"))
    np.testing.assert_array_equal(reference.mu, adm["mu"])
    np.testing.assert_array_equal(reference.sigma_s, adm["sigma_s"])
    assert reference.pool.shape == (5, POOL_DIM)  # still computed, for precision/recall
    np.savez(tmp_path / "stats_only.npz", **adm)
    stats_only = evaluator.reference(str(tmp_path / "stats_only.npz"))
    assert stats_only.pool is None
    np.testing.assert_array_equal(stats_only.mu_s, adm["mu_s"])
    np.savez(tmp_path / "empty.npz", labels=np.arange(3))
    with pytest.raises(ValueError, match="neither images"):
        evaluator.reference(str(tmp_path / "empty.npz"))


def test_a_statistics_only_reference_gives_fid_and_one_note_for_precision_and_recall(tmp_path):
    rng = np.random.default_rng(14)
    sample_images = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=sample_images)
    features = StubExtractor()(torch.from_numpy(sample_images).permute(0, 3, 1, 2))
    adm = {"mu": np.zeros(POOL_DIM), "sigma": np.eye(POOL_DIM), "mu_s": np.zeros(SPATIAL_DIM),
           "sigma_s": np.eye(SPATIAL_DIM)}
    np.savez(tmp_path / "stats.npz", **adm)
    evaluator = metrics.Evaluator("cpu", batch_size=2, metrics=("fid", "precision", "recall"))
    evaluator.extractor = StubExtractor()
    result = evaluator.evaluate(str(tmp_path / "stats.npz"), str(tmp_path / "samples.npz"))
    pool = features.pool.double().numpy()
    assert result["fid"] == pytest.approx(frechet_distance(pool.mean(0), np.cov(pool, rowvar=False), adm["mu"],
                                                           adm["sigma"]), rel=1e-9)
    assert result["precision"] is None and result["recall"] is None and "sfid" not in result
    assert result["num_samples"] == 5 and result["num_reference"] is None
    note = f"precision and recall need the reference images (arr_0); {tmp_path / 'stats.npz'} holds statistics only"
    assert metrics.format_table(result, ("fid", "precision", "recall")).splitlines() == [
        f"{'Metric':<16} {'Value':>12}", f"{'FID':<16} {result['fid']:12.4f}", f"{'Precision':<16} {'n/a':>12}",
        f"{'Recall':<16} {'n/a':>12}", f"note: {note}"]


def test_to_uint8_images_inverts_the_sampling_conversion():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    as_float = (pixels.float() - 127.5) / 127.5  # in [-1, 1]
    assert torch.equal(metrics.to_uint8_images(as_float), pixels)
    assert metrics.to_uint8_images(pixels) is pixels


def test_random_inception_weights_are_seeded_and_shaped_like_the_real_ones():
    first, second = random_inception_state_dict(seed=0), random_inception_state_dict(seed=0)
    assert first["fc.weight"].shape == (NUM_LOGITS, POOL_DIM)
    assert first["Mixed_6d.branch1x1.conv.weight"].shape == (192, 768, 1, 1)  # the sFID layer
    assert all(torch.equal(first[name], second[name]) for name in first)


#################################################################################
#                   End to end with a random Inception (subprocess)             #
#################################################################################

def run_evaluate(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    weights = str(folder / "random_inception.pth")
    torch.save(random_inception_state_dict(seed=0), weights)
    rng = np.random.default_rng(12)
    ref_images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    sample_images = np.clip(ref_images[:6].astype(int) + rng.integers(-40, 40, (6, 16, 16, 3)), 0, 255).astype(np.uint8)
    np.savez(folder / "ref.npz", arr_0=ref_images)
    np.savez(folder / "samples.npz", arr_0=sample_images)
    result = run_evaluate(str(folder / "ref.npz"), str(folder / "samples.npz"), "--device", "cpu", "--batch-size", "3",
                          "--inception-weights", weights, "--json", str(folder / "metrics.json"))
    return folder, weights, sample_images, result


@pytest.mark.slow
def test_pipeline_prints_the_table_and_writes_json_and_cache(pipeline):
    folder, _, _, result = pipeline
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("Inception Score", "FID", "sFID", "Precision", "Recall"):
        assert name in result.stdout
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["num_samples"] == 6 and metrics["num_reference"] == 8
    assert metrics["fid"] > 0 and metrics["sfid"] > 0 and metrics["inception_score"] >= 1.0
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    cache = np.load(folder / "ref.stats.npz")
    assert cache["pool"].shape == (8, POOL_DIM)
    assert cache["sigma_s"].shape == (SPATIAL_DIM, SPATIAL_DIM)
    np.testing.assert_allclose(cache["mu"], cache["pool"].astype(np.float64).mean(0), rtol=1e-6)


@pytest.mark.slow
def test_pipeline_metrics_match_in_process_features_and_fid_monitor(pipeline):
    folder, weights, sample_images, result = pipeline
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((folder / "metrics.json").read_text())
    monitor = FIDMonitor(str(folder / "ref.stats.npz"), "cpu", weights_path=weights)
    as_float = (torch.from_numpy(sample_images).permute(0, 3, 1, 2).float() - 127.5) / 127.5  # (N, 3, H, W)
    as_uint8 = torch.from_numpy(sample_images).permute(0, 3, 1, 2)  # (N, 3, H, W)
    batches = [monitor.extractor(as_uint8[:3]), monitor.extractor(as_uint8[3:])]  # the script's batches
    features = InceptionFeatures(*(torch.cat([getattr(b, name) for b in batches]) for name in ("pool", "spatial", "logits")))
    monitor.update(as_float[:4])
    monitor.update(as_float[4:])
    np.testing.assert_allclose(monitor.stats.mean, features.pool.double().mean(0).numpy(), rtol=1e-5, atol=1e-6)
    assert monitor.compute() == pytest.approx(metrics["fid"], rel=1e-4)
    assert inception_score(features.logits, from_logits=True) == pytest.approx(metrics["inception_score"], rel=1e-5)
    reference_pool = np.load(folder / "ref.stats.npz")["pool"]
    assert manifold_precision_recall(reference_pool, features.pool) == (metrics["precision"], metrics["recall"])


@pytest.mark.slow
def test_pipeline_reuses_the_cache_without_the_network(pipeline):
    folder, _, _, result = pipeline
    assert result.returncode == 0, result.stderr[-2000:]
    cache_mtime = os.stat(folder / "ref.stats.npz").st_mtime_ns
    # stats-only mode: a cache hit runs no network (no "reference" progress bar) and rewrites nothing
    again = run_evaluate(str(folder / "ref.npz"), "--device", "cpu", "--inception-weights", str(folder / "random_inception.pth"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Using cached reference statistics" in again.stderr and "reference:" not in again.stderr
    assert os.stat(folder / "ref.stats.npz").st_mtime_ns == cache_mtime


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    missing = run_evaluate(str(tmp_path / "nope.npz"), "--device", "cpu")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert_names(missing.stderr.strip().splitlines()[-1], "evaluate.py: error: ", str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    no_weights = run_evaluate(str(tmp_path / "ref.npz"), "--device", "cpu", "--inception-weights", str(tmp_path / "w.pth"))
    assert no_weights.returncode == 2  # a user error (was 1 before UsageError)
    assert_names(no_weights.stderr.strip().splitlines()[-1], "evaluate.py: error: ", str(tmp_path / "w.pth"))
    assert "Traceback" not in no_weights.stderr


def test_main_raises_usage_errors_in_process(tmp_path):
    with pytest.raises(UsageError) as error:
        evaluate.main([str(tmp_path / "nope.npz"), "--device", "cpu"])
    assert_names(error.value, str(tmp_path / "nope.npz"), "no such file")
    (tmp_path / "text.npz").write_text("not an npz")
    with pytest.raises(MetricInputError) as error:
        evaluate.main([str(tmp_path / "text.npz"), "--device", "cpu"])
    assert_names(error.value, str(tmp_path / "text.npz"), "zip")


def test_unusable_files_are_metric_input_errors_naming_the_file(tmp_path):
    (tmp_path / "text.npz").write_text("not an npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    np.savez(tmp_path / "labels.npz", labels=np.arange(3))
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 4, 4, 3), dtype=np.uint8))
    cases = [(metrics.open_npz_images, "text.npz", "readable"), (metrics.read_statistics_file, "text.npz", "zip"),
             (metrics.read_statistics_file, "single.npy", "single array"),
             (metrics.open_npz_images, "labels.npz", "'arr_0'"), (metrics.open_npz_images, "empty.npz", "no images"),
             (lambda path: FIDMonitor(path, "cpu"), "labels.npz", "mu/sigma")]
    for read, name, word in cases:
        with pytest.raises(MetricInputError) as error:
            read(str(tmp_path / name))
        assert_names(error.value, str(tmp_path / name), word)
