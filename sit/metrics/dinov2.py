"""FD-DINOv2 (Stein et al. 2023) as edm2 computes it: DINOv2 ViT-L/14's normalised CLS embeddings (1024-d)
of images resized to 224x224 (bicubic, antialiased), in timm's VisionTransformer with DINOv2's own
position-embedding interpolation. Weights: --dinov2-weights FILE (DINOv2's release or a timm state dict),
else the torch hub's file, else timm's, each read as tensors only (docs/evaluation.md#weights)."""
from __future__ import annotations

import math
import os
import re
from typing import Optional, Union

import torch
import torch.nn.functional as F

from sit.encoders import HEAD_DIM, IMAGENET_MEAN, IMAGENET_STD, read_weights, vit_args_from_weights
from sit.errors import UsageError

DINOV2_INPUT_SIZE = 224
DINOV2_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
DINOV2_TIMM_REPO = "timm/vit_large_patch14_dinov2.lvd142m"  # timm's vit_large_patch14_dinov2.lvd142m
DINOV2_TIMM_FILE = "model.safetensors"
INTERPOLATE_OFFSET = 0.1  # DINOv2's "historical kludge" in the scale factor, kept for identical features
DINOV2_RESIZE = f"bicubic {DINOV2_INPUT_SIZE}x{DINOV2_INPUT_SIZE}, antialiased (edm2's torch resize)"


class DINOv2WeightsError(UsageError):
    """DINOv2 weights that cannot be had or read; the message says where to put the file."""


def hub_weights_path() -> str:
    """Where torch.hub keeps dinov2_vitl14_pretrain.pth (`<torch hub dir>/checkpoints/`)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(DINOV2_WEIGHTS_URL))


def where_to_put_it() -> str:
    """The one-line advice for missing weights."""
    return (f"download {DINOV2_WEIGHTS_URL} to {hub_weights_path()}, or pass --dinov2-weights FILE "
            f"(that file, or timm's {DINOV2_TIMM_REPO.split('/')[1]} weights)")


def fetch_dinov2_weights(weights_path: Optional[str]) -> str:
    """A local DINOv2 ViT-L/14 weights file: the given one, else the torch hub's, else timm's (fetched by
    sit.hub when not on disk); DINOv2WeightsError saying where to put the file when none can be had."""
    from sit.hub import HubUnavailable, hub_file, url_file

    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise DINOv2WeightsError(f"DINOv2 weights file {weights_path!r} does not exist; {where_to_put_it()}")
        return weights_path
    failures = []
    try:
        return url_file(DINOV2_WEIGHTS_URL, hub_weights_path())  # the file there, else one request
    except HubUnavailable as error:  # network, HTTP or a folder not writable: timm's copy next (its cache first)
        failures.append(f"torch hub: {error}")
    try:
        return hub_file(DINOV2_TIMM_REPO, DINOV2_TIMM_FILE)
    except HubUnavailable as error:
        failures.append(f"timm/Hugging Face: {error}")
    raise DINOv2WeightsError(f"FD-DINOv2 needs the DINOv2 ViT-L/14 weights and none could be had "
                             f"({'; '.join(failures)}): {where_to_put_it()}")


def vit_config_of(state: dict[str, torch.Tensor], source: str) -> dict:
    """timm VisionTransformer arguments for a DINOv2-style state dict, read from its shapes (head size 64)."""
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                "norm.weight", "blocks.0.mlp.fc2.weight")
    missing = [key for key in required if key not in state]
    if missing:
        raise DINOv2WeightsError(f"{source} does not hold DINOv2 ViT weights (no {missing[0]}); {where_to_put_it()}")
    embed_dim = state["cls_token"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    if grid * grid != state["pos_embed"].shape[1] - 1 or embed_dim % HEAD_DIM:
        raise DINOv2WeightsError(f"{source}: a ViT this module cannot rebuild (pos_embed "
                                 f"{tuple(state['pos_embed'].shape)}, width {embed_dim}); {where_to_put_it()}")
    return dict(vit_args_from_weights(state, source), img_size=DINOV2_INPUT_SIZE, num_classes=0,
                global_pool="token")


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's interpolate_pos_encoding: (1, 1 + M*M, D) -> (1, 1 + grid*grid, D), the class token's kept."""
    patches = pos_embed.shape[1] - 1
    side = math.isqrt(patches)
    if side == grid:
        return pos_embed
    scale = (grid + INTERPOLATE_OFFSET) / side
    patch_embed = pos_embed[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
    patch_embed = F.interpolate(patch_embed, scale_factor=(scale, scale), mode="bicubic",
                                antialias=False)  # (1, D, grid, grid)
    patch_embed = patch_embed.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)  # (1, grid*grid, D)
    return torch.cat([pos_embed[:, :1].float(), patch_embed], dim=1).to(pos_embed.dtype)


def build_vit(state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """timm's VisionTransformer at 224 pixels with these weights (position embeddings interpolated), in eval mode."""
    from timm.models.vision_transformer import VisionTransformer

    state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key): value for key, value in state.items()
             if key != "mask_token"}  # DINOv2's chunked blocks.<chunk>.<i>. -> timm's blocks.<i>.
    config = vit_config_of(state, source)
    grid = DINOV2_INPUT_SIZE // config["patch_size"]
    state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], grid)
    with torch.device("meta"):  # no initialisation of ~300M parameters about to be overwritten
        network = VisionTransformer(**config)
    try:
        network.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        detail = " ".join(line.strip() for line in str(error).strip().splitlines()[1:2])[:200]
        raise DINOv2WeightsError(f"{source} does not fit a DINOv2 ViT ({detail}); {where_to_put_it()}") from None
    return network.float().eval().requires_grad_(False)


class DINOv2FeatureExtractor:
    """DINOv2 embeddings (N, D) of uint8 images (N, 3, H, W); D = 1024 for ViT-L/14."""

    def __init__(self, device: Union[str, torch.device] = "cpu", weights_path: Optional[str] = None):
        self.device = torch.device(device)
        self.weights_path = fetch_dinov2_weights(weights_path)
        try:
            state = read_weights(self.weights_path, "DINOv2 weights")
        except UsageError as error:  # a pickle other than a state dict is not loaded (it could run code)
            raise DINOv2WeightsError(f"{error}; {where_to_put_it()}") from None
        self.network = build_vit(state, self.weights_path).to(self.device)
        self.dim = self.network.embed_dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) uint8 -> (N, D) float32 embeddings (the normalised CLS token)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        pixels = F.interpolate(images.to(self.device, torch.float32), size=(DINOV2_INPUT_SIZE,) * 2,
                               mode="bicubic", antialias=True) / 255  # (N, 3, 224, 224)
        mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).reshape(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=pixels.device).reshape(1, 3, 1, 1)
        return self.network((pixels - mean) / std).float()  # edm2's resize, ImageNet's normalisation
