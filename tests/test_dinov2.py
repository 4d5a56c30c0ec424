"""FD-DINOv2 offline: a tiny randomly initialised timm ViT saved to a local file stands in for DINOv2
ViT-L/14; the preprocessing, the position-embedding interpolation and the Fréchet distance are checked
against computations written out here. --metrics names, and the one-line refusal without weights."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, tiny_vit_state, assert_names
from scipy import linalg
from timm.models.vision_transformer import VisionTransformer

import evaluate
from sit.errors import UsageError
from sit.files import sha256_file
from sit.metrics import DINOv2FeatureExtractor, DINOv2WeightsError, Evaluator, MetricInputError, parse_metric_list
from sit.metrics.dinov2 import interpolate_pos_embed
from test_hub import failing_hub, hub_at, only_line  # noqa: F401 (failing_hub: a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def weights_file(tiny_dinov2_weights):
    """tiny_vit_state() in a local file, as --dinov2-weights takes it."""
    return tiny_dinov2_weights


def hand_embeddings(state: dict, images: np.ndarray) -> np.ndarray:
    """edm2's recipe written out: bicubic antialiased 224 resize, /255, ImageNet mean/std, then the ViT
    at 224 with DINOv2's position-embedding interpolation (scale (16 + 0.1) / 4, bicubic)."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    pixels = torch.nn.functional.interpolate(pixels, size=(224, 224), mode="bicubic", antialias=True) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    grid = state["pos_embed"][:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)  # (1, D, 4, 4)
    grid = torch.nn.functional.interpolate(grid, scale_factor=16.1 / 4, mode="bicubic")  # (1, D, 16, 16)
    network = VisionTransformer(**dict(TINY_VIT, img_size=224)).eval()
    network.load_state_dict({**state, "pos_embed": torch.cat([state["pos_embed"][:, :1],
                                                              grid.flatten(2).transpose(1, 2)], dim=1)})
    with torch.no_grad():
        return network(pixels).double().numpy()


def hand_frechet(first: np.ndarray, second: np.ndarray) -> float:
    mu1, mu2 = first.mean(0), second.mean(0)
    sigma1, sigma2 = np.cov(first, rowvar=False), np.cov(second, rowvar=False)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * linalg.sqrtm(sigma1 @ sigma2).real))


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batches")
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (7, 40, 40, 3), dtype=np.uint8)
    samples = (ref[:5] // 3 + np.linspace(0, 170, 40, dtype=np.uint8)[None, :, None, None]).astype(np.uint8)  # a ramp
    np.savez(folder / "ref.npz", arr_0=ref)
    np.savez(folder / "samples.npz", arr_0=samples)
    return folder, ref, samples


def test_embeddings_follow_edm2s_recipe(weights_file, batches):
    _, ref, _ = batches
    extractor = DINOv2FeatureExtractor("cpu", weights_file)
    ours = extractor(torch.from_numpy(ref).permute(0, 3, 1, 2)).double().numpy()
    np.testing.assert_allclose(ours, hand_embeddings(tiny_vit_state(), ref), rtol=1e-5, atol=1e-6)
    assert extractor.dim == 64


def test_position_embeddings_interpolate_like_dinov2_and_keep_the_class_token():
    pos_embed = torch.randn(1, 1 + 37 * 37, 8)
    resized = interpolate_pos_embed(pos_embed, 16)
    assert resized.shape == (1, 1 + 16 * 16, 8) and torch.equal(resized[:, 0], pos_embed[:, 0])
    by_scale = torch.nn.functional.interpolate(pos_embed[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2),
                                               scale_factor=16.1 / 37, mode="bicubic")
    torch.testing.assert_close(resized[:, 1:], by_scale.flatten(2).transpose(1, 2), rtol=0, atol=0)
    assert interpolate_pos_embed(resized, 16) is resized  # already on the grid


def test_dinov2s_own_checkpoint_names_load_the_same_network(weights_file, tmp_path, batches):
    """DINOv2's checkpoints carry a mask token and, when chunked, blocks.<chunk>.<i>.: same embeddings."""
    state = tiny_vit_state()
    native = {key.replace("blocks.", "blocks.0.", 1): value for key, value in state.items()}  # one chunk
    native["mask_token"] = torch.zeros(1, 64)
    torch.save(native, tmp_path / "native.pth")
    _, ref, _ = batches
    images = torch.from_numpy(ref).permute(0, 3, 1, 2)
    torch.testing.assert_close(DINOv2FeatureExtractor("cpu", str(tmp_path / "native.pth"))(images),
                               DINOv2FeatureExtractor("cpu", weights_file)(images), rtol=0, atol=0)


def test_fd_dinov2_equals_the_frechet_distance_computed_by_hand(weights_file, batches):
    folder, ref, samples = batches
    evaluator = Evaluator("cpu", batch_size=3, metrics=("fd_dinov2",), dinov2_weights=weights_file)
    result = evaluator.evaluate(str(folder / "ref.npz"), str(folder / "samples.npz"))
    state = tiny_vit_state()
    expected = hand_frechet(hand_embeddings(state, samples), hand_embeddings(state, ref))
    assert result["fd_dinov2"] == pytest.approx(expected, rel=1e-6)
    assert expected > 1e-3  # far above float error (a set against itself gives ~1e-12)
    assert result["num_samples"] == 5 and result["num_reference"] == 7 and result["notes"] == {}
    assert evaluator.extractor is None  # no Inception for fd_dinov2 alone
    cache = np.load(folder / "ref.dinov2.npz")
    assert int(cache["count"]) == 7 and cache["sigma"].shape == (64, 64)
    again = Evaluator("cpu", batch_size=3, metrics=("fd_dinov2",), dinov2_weights=weights_file)  # the cached reference
    assert again.evaluate(str(folder / "ref.npz"), str(folder / "samples.npz"))["fd_dinov2"] == result["fd_dinov2"]


def test_evaluate_writes_fd_dinov2_and_its_settings(weights_file, batches, capsys):
    folder, _, _ = batches
    out = folder / "metrics.json"
    evaluate.main([str(folder / "ref.npz"), str(folder / "samples.npz"), "--device", "cpu", "--metrics", "fd_dinov2",
                   "--dinov2-weights", weights_file, "--json", str(out)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["Metric", "Value"] and table[1].startswith("FD-DINOv2") and len(table) == 2
    written = json.loads(out.read_text())
    assert float(table[1].split()[1]) == pytest.approx(written["fd_dinov2"], abs=1e-4)
    assert "fid" not in written and written["sample_record"] is None
    assert written["evaluator"]["metrics"] == ["fd_dinov2"] and written["evaluator"]["inception"] is None
    assert written["evaluator"]["dinov2"]["sha256"] == sha256_file(weights_file)
    assert written["evaluator"]["reference"]["sha256"] == sha256_file(str(folder / "ref.npz"))


def test_metric_names_are_parsed_in_table_order_and_unknown_ones_refused_with_the_valid_list(tmp_path):
    assert parse_metric_list("fd_dinov2,fid,is") == ("is", "fid", "fd_dinov2")
    assert parse_metric_list("fid, fid ,") == ("fid",)
    expected = "--metrics 'fid,kid': unknown metric 'kid'; choose from is,fid,sfid,precision,recall,fd_dinov2"
    with pytest.raises(UsageError) as raised:
        parse_metric_list("fid,kid")
    assert str(raised.value) == expected
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(UsageError, match="^--metrics '': .*is,fid,"):
        evaluate.main([str(tmp_path / "ref.npz"), "--device", "cpu", "--metrics", ""])


def test_unreadable_or_foreign_dinov2_weights_are_refused(tmp_path, batches):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(DINOv2WeightsError, match=r"other\.pth .*cls_token.*https://dl\.fbaipublicfiles\.com/dinov2/"):
        DINOv2FeatureExtractor("cpu", str(tmp_path / "other.pth"))
    with pytest.raises(DINOv2WeightsError, match=r"missing\.pth.* not exist"):
        DINOv2FeatureExtractor("cpu", str(tmp_path / "missing.pth"))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3), mu_s=np.zeros(3), sigma_s=np.eye(3))
    folder, _, _ = batches
    with pytest.raises(MetricInputError, match=r"stats\.npz .*arr_0"):
        Evaluator("cpu", metrics=("fd_dinov2",)).evaluate(str(tmp_path / "stats.npz"), str(folder / "samples.npz"))


@pytest.mark.slow
def test_no_network_and_no_file_is_one_line_saying_where_to_put_it(tmp_path, batches):
    folder, _, _ = batches
    offline = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
                   HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")  # nothing can be fetched
    result = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), str(folder / "ref.npz"),
                             str(folder / "samples.npz"), "--device", "cpu", "--metrics", "fd_dinov2"],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=offline)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("evaluate.py: error: ")  # where to put the file, and the flag that reads it
    assert_names(last, str(tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vitl14_pretrain.pth"), "--dinov2-weights")
    assert "Traceback" not in result.stderr


def test_without_network_each_source_is_asked_once_and_the_line_says_where_to_put_the_file(tmp_path, failing_hub,
                                                                                            monkeypatch, capfd, caplog):
    """HF_HUB_OFFLINE unset and every server failing: one request to the torch hub's URL, one to timm's
    file on the hub (no retries), then one line naming both files, where to put one and --dinov2-weights."""
    import time

    import sit.metrics.dinov2 as dinov2

    endpoint, requests = failing_hub
    hub_at(monkeypatch, tmp_path, endpoint)
    url = f"{endpoint}/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
    monkeypatch.setattr(dinov2, "DINOV2_WEIGHTS_URL", url)
    start = time.monotonic()
    with pytest.raises(DINOv2WeightsError) as raised:
        dinov2.fetch_dinov2_weights(None)
    line = only_line(raised.value, capfd.readouterr().err + caplog.text, time.monotonic() - start)
    timm_file = "timm/vit_large_patch14_dinov2.lvd142m/resolve/main/model.safetensors"
    assert_names(line, url, f"{endpoint}/{timm_file}", "--dinov2-weights",
                 str(tmp_path / "torch_hub" / "checkpoints" / "dinov2_vitl14_pretrain.pth"))
    files = [request for request in requests if " /api/" not in request]  # (huggingface_hub asks its API too)
    assert files == ["GET /dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth", f"HEAD /{timm_file}"]
