"""Frozen vision encoders for --repa-encoder (docs/training.md): a DINOv2 alias, a timm ViT name, a local
weights file or timm folder, read without running pickled code; their final-norm patch tokens of images
resized to 224/256 of their size and normalised with the encoder's mean and std.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from sit.errors import UsageError, error_line
from sit.speed import autocast

FLAG = "--repa-encoder"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# REPA's encoders see 224 px for 256 px images (torch.nn.functional.interpolate to 224 * resolution / 256).
INPUT_SCALE = (224, 256)
DINOV2_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
REPA_SPELLING = re.compile(r"^dinov2(reg)?-vit-([sblg])$")     # REPA's --enc-type
HUB_SPELLING = re.compile(r"^dinov2_vit([sblg])14(_reg)?$")     # torch.hub facebookresearch/dinov2
HEAD_DIM = 64  # every DINOv2 (S/B/L/g: 6/12/16/24 heads); how a weights file's heads are counted
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # a timm folder's (and hub repository's) weights
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
NAMES_HELP = ("dinov2-vit-s/b/l/g (REPA's), dinov2_vitb14[_reg] (torch.hub's), a timm ViT name, "
              "or a local weights file or timm folder")


def dinov2_timm_name(size: str, registers: bool) -> str:
    """timm's name of a released DINOv2: size one of s, b, l, g."""
    return f"vit_{DINOV2_SIZES[size]}_patch14{'_reg4' if registers else ''}_dinov2.lvd142m"


def canonical_encoder_name(name: Optional[str]) -> Optional[str]:
    """The recorded spelling: a DINOv2 alias -> its timm name, a local path -> absolute, else as given."""
    if name is None:
        return None
    if os.path.exists(name):
        return os.path.abspath(name)
    if match := REPA_SPELLING.match(name):
        return dinov2_timm_name(match.group(2), registers=bool(match.group(1)))
    if match := HUB_SPELLING.match(name):
        return dinov2_timm_name(match.group(1), registers=bool(match.group(2)))
    return name


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder as a recipe: `source` (canonical), its timm `architecture` and `model_args` (None: a
    VisionTransformer inferred from a weights file), patch size, token width, normalisation."""
    source: str
    architecture: Optional[str]
    model_args: dict
    patch_size: int
    embed_dim: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def input_size(self, image_size: int) -> int:
        """The encoder's input side for images of image_size; UsageError unless a whole number of patches."""
        scaled = image_size * INPUT_SCALE[0] / INPUT_SCALE[1]
        if scaled != int(scaled) or int(scaled) % self.patch_size:
            step = INPUT_SCALE[1] * self.patch_size // math.gcd(INPUT_SCALE[0], INPUT_SCALE[1] * self.patch_size)
            raise UsageError(f"--image-size {image_size} gives {FLAG} {self.source} inputs of {scaled:g} px "
                             f"(224/256 of the image, as REPA), not a multiple of its patch size {self.patch_size}: "
                             f"use an --image-size that is a multiple of {step}")
        return int(scaled)

    def build(self, image_size: int) -> torch.nn.Module:
        """The encoder's timm ViT for images of image_size on the CPU, randomly initialised (weights: load_encoder)."""
        import timm
        from timm.models.vision_transformer import VisionTransformer

        args = dict(self.model_args, num_classes=0, img_size=self.input_size(image_size))
        with torch.device("cpu"):
            if self.architecture is None:
                return VisionTransformer(**args)
            return timm.create_model(self.architecture, pretrained=False, **args)


def read_weights(path: str, flag: str = FLAG) -> dict:
    """The state dict in a local file, read without unpickling code (UsageError naming the flag)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            weights = load_file(path, device="cpu")
        else:
            try:  # memory-mapped: the checks read only the shapes
                weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be mapped
                weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle that weights_only refuses, a truncated or foreign file
        raise UsageError(f"{flag} {path}: cannot read its weights "
                         f"({error_line(error, with_type=False)})") from None
    for key in ("model", "state_dict"):  # common wrappers of a state dict
        if isinstance(weights, dict) and isinstance(weights.get(key), dict):
            weights = weights[key]
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise UsageError(f"{flag} {path} does not hold a state dict of tensors")
    return weights


def timm_form(weights: dict) -> dict:
    """A ViT state dict in timm's names: DINOv2's release names converted (chunked blocks, SwiGLU, register
    tokens as timm's no_embed_class models hold them), the mask token and classifier head dropped."""
    weights = {key: value for key, value in weights.items() if not key.startswith("head.") and key != "mask_token"}
    if "register_tokens" in weights:
        weights["reg_token"] = weights.pop("register_tokens")
        weights["cls_token"] = weights["cls_token"] + weights["pos_embed"][:, 0]  # (1, 1, D)
        weights["pos_embed"] = weights["pos_embed"][:, 1:]                          # (1, N, D)
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # chunked blocks.<chunk>.<i>. (global i)
            .replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): value
            for key, value in weights.items()}


def vit_args_from_weights(weights: dict, source: str) -> dict:
    """timm VisionTransformer arguments that fit a timm-form ViT state dict (see timm_form)."""
    if "patch_embed.proj.weight" not in weights or "blocks.0.mlp.fc2.weight" not in weights:
        raise UsageError(f"{FLAG} {source} does not hold ViT weights (no patch_embed.proj / blocks.*.mlp)")
    embed_dim, in_chans, patch_size, _ = weights["patch_embed.proj.weight"].shape  # (D, C, p, p)
    depth = 1 + max(int(key.split(".")[1]) for key in weights if key.startswith("blocks."))
    hidden = weights["blocks.0.mlp.fc2.weight"].shape[1]
    args = dict(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                num_heads=max(1, embed_dim // HEAD_DIM), mlp_ratio=hidden / embed_dim,
                qkv_bias="blocks.0.attn.qkv.bias" in weights, class_token="cls_token" in weights,
                reg_tokens=weights["reg_token"].shape[1] if "reg_token" in weights else 0,
                init_values=1.0 if "blocks.0.ls1.gamma" in weights else None)
    prefix = int(args["class_token"]) + args["reg_tokens"]
    positions = weights["pos_embed"].shape[1] if "pos_embed" in weights else 0
    # class and register tokens outside the position embedding (DINOv2 with registers, in timm's form):
    # then it has a square number of rows; with the class token inside it has 1 + a square
    args["no_embed_class"] = prefix > 0 and math.isqrt(positions) ** 2 == positions
    if weights["blocks.0.mlp.fc1.weight"].shape[0] == 2 * hidden:  # DINOv2-g's packed SwiGLU
        from timm.layers import SwiGLUPacked

        args.update(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    return args


def looks_like_path(name: str) -> bool:
    """Whether an encoder value is meant as a local path (a separator, a leading . or ~, a weights suffix)."""
    return (os.sep in name or "/" in name or name.startswith((".", "~"))
            or name.lower().endswith(WEIGHT_SUFFIXES))


def describe_encoder(name: str) -> EncoderSpec:
    """The EncoderSpec a --repa-encoder value names, without loading weights (a file is read for its shapes);
    UsageError naming the flag for a missing path or an unknown encoder."""
    import timm

    source = canonical_encoder_name(name)
    if not os.path.exists(source) and looks_like_path(source):
        raise UsageError(f"{FLAG} {name}: no such file or folder ({os.path.abspath(os.path.expanduser(name))})")
    if os.path.isfile(source):
        args = vit_args_from_weights(timm_form(read_weights(source)), source)
        return EncoderSpec(source, None, args, args["patch_size"], args["embed_dim"])
    if os.path.isdir(source):
        config_path = os.path.join(source, "config.json")
        if not os.path.isfile(config_path) or not any(os.path.isfile(os.path.join(source, f)) for f in WEIGHT_FILES):
            raise UsageError(f"{FLAG} {source}: a folder needs timm's config.json and one of {', '.join(WEIGHT_FILES)}")
        with open(config_path) as handle:
            config = json.load(handle)
        architecture, model_args = config.get("architecture"), dict(config.get("model_args") or {})
        pretrained = config.get("pretrained_cfg") or {}
    elif timm.is_model(source):
        architecture, model_args, pretrained = source, {}, None
    else:
        raise UsageError(f"unknown {FLAG} {name}: give {NAMES_HELP}")
    if not timm.is_model(architecture):
        raise UsageError(f"{FLAG} {source}: unknown timm architecture {architecture!r}")
    with torch.device("meta"):  # the shapes only: no memory, no initialisation
        model = timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)
    if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        raise UsageError(f"{FLAG} {source}: {architecture} is not a ViT with patch tokens")
    if pretrained is None:  # a timm name: its own pretrained config's normalisation
        pretrained = getattr(model, "pretrained_cfg", None) or {}
    mean, std = tuple(pretrained.get("mean", IMAGENET_MEAN)), tuple(pretrained.get("std", IMAGENET_STD))
    return EncoderSpec(source, architecture, model_args, model.patch_embed.patch_size[0], model.embed_dim,
                       mean, std)


class VisionEncoder:
    """A frozen ViT in eval mode and the preprocessing its tokens need."""

    def __init__(self, spec: EncoderSpec, module: torch.nn.Module, image_size: int):
        self.spec = spec
        self.module = module.eval().requires_grad_(False)
        self.input_size = spec.input_size(image_size)

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @torch.no_grad()
    def patch_tokens(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Patch tokens (N, T, D) float32 of images (N, 3, H, W) in [-1, 1]; T = (input size / patch)^2.
        Normalise and resize in fp32, the ViT under the --precision autocast."""
        pixels = encoder_inputs(images, self.spec.mean, self.spec.std, self.input_size)
        with autocast(precision, images.device):
            tokens = self.module.forward_features(pixels)                   # (N, prefix + T, D)
        return tokens[:, self.module.num_prefix_tokens:].float()           # (N, T, D)


def encoder_inputs(images: torch.Tensor, mean: tuple, std: tuple, input_size: int) -> torch.Tensor:
    """What an encoder sees of images (N, 3, H, W) in [-1, 1]: [0, 1], normalised by mean and std,
    then (REPA's order) resized bicubically to input_size; (N, 3, input_size, input_size) float32."""
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    pixels = ((images.float() + 1) / 2 - mean) / std                       # (N, 3, H, W)
    if pixels.shape[-1] != input_size or pixels.shape[-2] != input_size:
        pixels = F.interpolate(pixels, size=(input_size, input_size), mode="bicubic")
    return pixels


def load_encoder(name: str, image_size: int, device: torch.device) -> VisionEncoder:
    """The frozen encoder --repa-encoder names, for images of image_size, on device (UsageError naming the
    flag). The torch RNG is left as it was: a run with an encoder draws the same noise as one without."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    with torch.random.fork_rng(devices=[]):  # the module is built on the CPU
        spec = describe_encoder(name)
        source = spec.source
        if os.path.isfile(source) or os.path.isdir(source):
            module = spec.build(image_size)
            path = source if os.path.isfile(source) else next(
                os.path.join(source, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(source, f)))
            weights = timm_form(read_weights(path))
            try:  # strictly, the position embedding resampled to the model's grid
                module.load_state_dict(checkpoint_filter_fn(weights, module), strict=True)
            except (RuntimeError, KeyError, ValueError) as error:
                detail = " ".join(line.strip() for line in str(error).strip().splitlines()[:2])[:300]
                raise UsageError(f"{FLAG} {source}: its weights do not fit the ViT they describe ({detail})") from None
        else:  # timm builds it and loads the released weights, read here from the file fetched by sit.hub
            weights = read_weights(released_weights(name, source))
            try:
                module = timm.create_model(source, pretrained=True, num_classes=0, img_size=spec.input_size(image_size),
                                           pretrained_cfg_overlay=dict(state_dict=weights))
            except Exception as error:  # weights that do not fit the architecture
                raise UsageError(f"{FLAG} {name}: the released weights of {source} do not load "
                                 f"({error_line(error, with_type=False)})") from None
        return VisionEncoder(spec, module.to(device), image_size)


def released_weights(name: str, source: str) -> str:
    """The local file of a timm model's released weights (its hub repository's, else its URL's), cached
    or fetched by sit.hub (timm downloads nothing); UsageError naming the file and how to pass it instead."""
    from timm.models import get_pretrained_cfg

    from sit.hub import HubFileMissing, HubUnavailable, cached_hub_file, hub_file, url_file

    config = get_pretrained_cfg(source)
    repo_id, url = (config.hf_hub_id, config.url) if config is not None else (None, None)
    if repo_id:
        files = (config.hf_hub_filename,) if config.hf_hub_filename else WEIGHT_FILES
        cached = next((path for path in map(functools.partial(cached_hub_file, repo_id), files) if path), None)
        if cached is not None:
            return cached
        for filename in files:
            try:
                return hub_file(repo_id, filename)
            except HubUnavailable as error:
                failure = error
                if not isinstance(error, HubFileMissing):  # unreachable; missing: the hub answered, try the next
                    break
        import huggingface_hub

        where = huggingface_hub.hf_hub_url(repo_id, filename)
    elif url and not config.custom_load:  # (a custom load reads another format, e.g. big_vision's .npz)
        filename = os.path.basename(url.split("?")[0])
        try:
            return url_file(url, os.path.join(torch.hub.get_dir(), "checkpoints", filename))
        except HubUnavailable as error:
            failure, where = error, url
    else:
        raise UsageError(f"{FLAG} {name}: timm publishes no weights for {source}; pass a local weights file")
    raise UsageError(f"{FLAG} {name}: cannot get the weights of {source}: {failure}; download {where} where there is "
                     f"network and pass {FLAG} /path/to/{filename}")
