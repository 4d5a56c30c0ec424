"""Shared test fixtures: a tiny VAE with SD-VAE's downsampling, a tiny image folder, and a tiny
DINOv2-style ViT standing in for DINOv2 ViT-L/14 (FD-DINOv2)."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def make_tiny_vae(path: str) -> str:
    """A randomly initialised diffusers AutoencoderKL (4 latent channels, downsampling 8), saved to path."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(path)
    return path


def make_image_folder(path: str, num_classes: int = 2, per_class: int = 4, size: int = 32, seed: int = 0) -> str:
    """An ImageFolder of random RGB PNGs, some of them not square."""
    rng = np.random.default_rng(seed)
    for label in range(num_classes):
        folder = os.path.join(path, f"class{label}")
        os.makedirs(folder, exist_ok=True)
        for index in range(per_class):
            height, width = (size, size + 8 * (index % 2))
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{index}.png"))
    return path


class MakesMarker:
    """A pickle payload that would create a folder on load (stand-in for os.system)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


TINY_VIT = dict(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=1, mlp_ratio=4.0, init_values=1e-5,
                num_classes=0, global_pool="token")  # head size 64 like every DINOv2; a 4x4 grid of patches


def write_cached_latents(path: str, num_latents: int, corrupt=None) -> str:
    """A feature folder (extract_features.py's format) of num_latents 4x4x4 posteriors of 32 px images in two
    classes: random means, std 0.1; corrupt(mean), if given, alters the means before they are written."""
    from sit.data.features import open_arrays, write_meta

    os.makedirs(path)
    meta = dict(image_size=32, vae="ema", num_images=num_latents, classes=["a", "b"], dtype="float32",
                block_size=num_latents, latent_shape=[4, 4, 4], data_path="/nowhere", complete=True)
    mean, std, labels = open_arrays(path, meta, "w+")
    mean[:] = np.random.default_rng(0).normal(size=mean.shape).astype(np.float32)
    std[:], labels[:] = 0.1, np.arange(num_latents) % 2
    if corrupt is not None:
        corrupt(mean)
    for array in (mean, std, labels):
        array.flush()
    write_meta(path, meta)
    return path


def tiny_vit_state(seed: int = 0) -> dict:
    """A randomly initialised timm VisionTransformer in DINOv2's layout (LayerScale, CLS token), as a state dict."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    network = VisionTransformer(**TINY_VIT)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0, 0.2)
    return network.state_dict()


@pytest.fixture(scope="session")
def tiny_dinov2_weights(tmp_path_factory) -> str:
    """tiny_vit_state() saved to a local weights file (what --dinov2-weights takes)."""
    path = tmp_path_factory.mktemp("dinov2") / "tiny_vit.pth"
    torch.save(tiny_vit_state(), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> str:
    return make_tiny_vae(str(tmp_path_factory.mktemp("vae") / "vae"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> str:
    return make_image_folder(str(tmp_path_factory.mktemp("images") / "train"))


@pytest.fixture(autouse=True)
def restore_grad_mode():
    """The scripts' main() turn gradients off globally (sampling); in-process tests must not leak that."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


def assert_names(message: object, *words: str) -> str:
    """An error message (an exception, or a script's stderr) is one line holding each of `words`: the flag or
    file it names and at most a key word telling the kind of problem apart, not the whole sentence, so that
    rewording a message does not churn the tests. Returns the line."""
    lines = [line for line in str(message).splitlines() if line.strip()]
    assert len(lines) == 1, message
    missing = [word for word in words if word not in lines[0]]
    assert not missing, (missing, lines[0])
    return lines[0]


def random_inception_state_dict(seed: int = 0) -> dict:
    """Randomly initialised weights of the FID Inception's architecture (torchvision's Inception-v3 has
    torch-fidelity's names and shapes); He-normal convolutions keep activations of order one."""
    import math

    from torchvision.models import inception_v3

    from sit.metrics.inception_weights import NUM_LOGITS

    generator = torch.Generator().manual_seed(seed)
    state_dict = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=NUM_LOGITS).state_dict()
    for name, tensor in state_dict.items():
        if tensor.dim() == 4:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * math.sqrt(2.0 / tensor[0].numel()))
        elif name == "fc.weight":
            tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(tensor.shape[1]))
        elif name == "fc.bias":
            tensor.zero_()
    return state_dict
