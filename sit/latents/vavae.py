"""VA-VAE f16d32 (LightningDiT's tokenizer): --vae vavae-f16d32 (the hub file) or a local LDM-format
checkpoint, renamed onto a diffusers AutoencoderKL of its shape (attention at the lowest level); raw
latents, scale 1, until per-channel statistics replace it."""
from __future__ import annotations

import itertools
import os
import re
from typing import Any, Mapping

import torch

from sit.encoders import read_weights
from sit.errors import UsageError, error_line
from sit.hub import HubUnavailable, hub_file
from sit.latents.autoencoder import AutoencoderKLSpace
from sit.latents.space import Normalisation

VAVAE_NAME = "vavae-f16d32"  # its --vae entry
VAVAE_REPO = "hustvl/vavae-imagenet256-f16d32-dinov2"
VAVAE_FILE = "vavae-imagenet256-f16d32-dinov2.pt"
VAVAE_WIDTHS = (128, 128, 256, 256, 512)  # ch 128 x ch_mult (1, 1, 2, 2, 4): 5 levels, downsampling 16
VAVAE_CHANNELS = 32
VAVAE_LAYERS = 2  # num_res_blocks (the decoder has one more a level)
# the network's parts; the rest (the loss, the DINOv2 alignment, an EMA copy) is training's
LDM_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
WHERE = (f"put {VAVAE_FILE} (https://huggingface.co/{VAVAE_REPO}) on this machine and pass "
         f"--vae /path/to/{VAVAE_FILE}, or --vae {VAVAE_NAME} with network access once")


def vavae_network(widths: tuple[int, ...] = VAVAE_WIDTHS) -> Any:
    """A random diffusers AutoencoderKL of VA-VAE's architecture (widths multiples of 32), in eval mode."""
    from diffusers.models import AutoencoderKL

    levels = len(widths)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=widths,
                         layers_per_block=VAVAE_LAYERS,
                         down_block_types=("DownEncoderBlock2D",) * (levels - 1) + ("AttnDownEncoderBlock2D",),
                         up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (levels - 1),
                         latent_channels=VAVAE_CHANNELS, norm_num_groups=32, sample_size=256,
                         scaling_factor=1.0).eval()


def _renamer(levels: int) -> list[tuple[str, Any]]:
    """(pattern, replacement) pairs taking an LDM key to its diffusers name, applied in order."""
    def up(part: str) -> Any:  # LDM's up[i] is level i (0: full size); diffusers' up_blocks run from the lowest
        return lambda match: f"decoder.up_blocks.{levels - 1 - int(match[1])}.{part}"
    return [
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.", up("resnets.")),
        (r"^decoder\.up\.(\d+)\.attn\.", up("attentions.")),
        (r"^decoder\.up\.(\d+)\.upsample\.", up("upsamplers.0.")),
        (r"^(en|de)coder\.mid\.block_(\d)\.", lambda match: f"{match[1]}coder.mid_block.resnets.{int(match[2]) - 1}."),
        (r"^(en|de)coder\.mid\.attn_1\.", r"\1coder.mid_block.attentions.0."),
        (r"^(en|de)coder\.norm_out\.", r"\1coder.conv_norm_out."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
        (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."),
        (r"(attentions\.\d+)\.([qkv])\.", r"\1.to_\2."),
        (r"(attentions\.\d+)\.proj_out\.", r"\1.to_out.0."),
    ]


def diffusers_state_dict(ldm: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """An LDM state dict's network parts renamed onto diffusers' AutoencoderKL; UsageError on a collision."""
    renames = _renamer(levels)
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in ldm.items():
        if not key.startswith(LDM_PARTS):
            continue
        name = key
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        if ".attentions." in name and name.endswith("weight") and tensor.dim() == 4:
            tensor = tensor[:, :, 0, 0]  # (C, C, 1, 1) -> (C, C)
        if name in mapped:
            raise UsageError(f"the VA-VAE checkpoint maps two keys onto {name}; {WHERE}")
        mapped[name] = tensor
    return mapped


def vavae_from_ldm(ldm: Mapping[str, torch.Tensor], source: str) -> Any:
    """The diffusers AutoencoderKL holding an LDM-format VA-VAE state dict (strictly); UsageError naming
    `source` when it is not of VA-VAE's shape."""
    keys = (f"encoder.down.{level}.block.0.conv1.weight" for level in itertools.count())  # each level's first
    widths = tuple(ldm[key].shape[0] for key in itertools.takewhile(ldm.__contains__, keys))  # resnet's width
    channels = ldm["post_quant_conv.weight"].shape[0] if "post_quant_conv.weight" in ldm else None
    if len(widths) != len(VAVAE_WIDTHS) or channels != VAVAE_CHANNELS:
        raise UsageError(f"{source} is not an LDM-format VA-VAE f16d32 checkpoint ({len(widths)} encoder levels, "
                         f"{channels} latent channels; expected {len(VAVAE_WIDTHS)} and {VAVAE_CHANNELS}); {WHERE}")
    network = vavae_network(widths)
    state = diffusers_state_dict(ldm, len(widths))
    missing, extra = sorted(set(network.state_dict()) - set(state)), sorted(set(state) - set(network.state_dict()))
    if missing or extra:
        what = f"lacks {len(missing)} weights (the first: {missing[0]})" if missing else \
               f"has {len(extra)} weights VA-VAE has no place for (the first: {extra[0]})"
        raise UsageError(f"{source} does not fit VA-VAE's architecture: it {what}; {WHERE}")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UsageError(f"{source} does not fit VA-VAE's architecture ({error_line(error)}); {WHERE}") from None
    return network


class VAVAESpace(AutoencoderKLSpace):
    """VA-VAE f16d32's raw latents. name: "vavae-f16d32" (the hub file) or an LDM checkpoint's path."""
    channels = VAVAE_CHANNELS
    downsampling = 2 ** (len(VAVAE_WIDTHS) - 1)
    normalisation = Normalisation(scale=1.0)

    def checkpoint_file(self) -> str:
        """The local LDM checkpoint: the given file, or the hub's (cached, else fetched)."""
        if self.name != VAVAE_NAME:
            return self.name
        try:
            return hub_file(VAVAE_REPO, VAVAE_FILE)
        except HubUnavailable as error:
            raise UsageError(f"could not load {VAVAE_NAME}: {error}; {WHERE}") from None

    def load_network(self, device: torch.device) -> Any:
        path = self.checkpoint_file()
        if not os.path.isfile(path):
            raise UsageError(f"the VA-VAE checkpoint {path} does not exist; {WHERE}")
        try:  # weights_only; "state_dict" of a Lightning checkpoint
            ldm = read_weights(path, "the VA-VAE checkpoint")
        except UsageError as error:
            raise UsageError(f"{error}; {WHERE}") from None
        return vavae_from_ldm(ldm, path).to(device).requires_grad_(False)
