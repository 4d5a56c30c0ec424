"""sit/encoders.py: --repa-encoder names, local weights (timm and DINOv2 release formats, timm folders)
read without unpickling code, the input size rule, and the patch tokens against a hand computation.
Tiny randomly initialised timm ViTs stand in for DINOv2 (offline)."""
import json
import os
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from sit.encoders import (IMAGENET_MEAN, IMAGENET_STD, canonical_encoder_name, describe_encoder, load_encoder,
                          timm_form)
from sit.errors import UsageError
from conftest import assert_names
from test_hub import COMMIT, failing_hub, file_requests, hub_at, only_line  # noqa: F401 (failing_hub: a fixture)

CPU = torch.device("cpu")


def tiny_vit(**overrides) -> VisionTransformer:
    """A 2-block ViT with one 64-dim head (DINOv2's head width), 28 px input, patch 7: 4 x 4 tokens."""
    torch.manual_seed(0)
    args = dict(img_size=28, patch_size=7, embed_dim=64, depth=2, num_heads=1, num_classes=0)
    args.update(overrides)
    vit = VisionTransformer(**args).eval()
    with torch.no_grad():  # nonzero everywhere (timm zero-initialises some biases)
        for param in vit.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return vit


def tokens_by_hand(vit: VisionTransformer, images: torch.Tensor, input_size: int) -> torch.Tensor:
    """REPA's preprocessing written out: [-1, 1] -> [0, 1] -> ImageNet normalisation -> bicubic resize."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = F.interpolate(((images + 1) / 2 - mean) / std, size=(input_size, input_size), mode="bicubic")
    with torch.no_grad():
        return vit.forward_features(pixels)[:, vit.num_prefix_tokens:]


def test_names_of_dinov2_map_to_the_released_weights_in_timm():
    assert canonical_encoder_name("dinov2-vit-b") == "vit_base_patch14_dinov2.lvd142m"  # REPA's spelling
    assert canonical_encoder_name("dinov2-vit-g") == "vit_giant_patch14_dinov2.lvd142m"
    assert canonical_encoder_name("dinov2reg-vit-l") == "vit_large_patch14_reg4_dinov2.lvd142m"
    assert canonical_encoder_name("dinov2_vits14") == "vit_small_patch14_dinov2.lvd142m"  # torch.hub's
    assert canonical_encoder_name("dinov2_vitb14_reg") == "vit_base_patch14_reg4_dinov2.lvd142m"
    assert canonical_encoder_name(None) is None
    spec = describe_encoder("dinov2-vit-b")  # shapes only: nothing downloaded
    assert (spec.patch_size, spec.embed_dim, spec.mean, spec.std) == (14, 768, IMAGENET_MEAN, IMAGENET_STD)
    assert describe_encoder("dinov2_vitl14").embed_dim == 1024


def test_input_size_follows_repa():
    spec = describe_encoder("dinov2-vit-s")
    assert spec.input_size(256) == 224 and spec.input_size(512) == 448 and spec.input_size(64) == 56
    with pytest.raises(UsageError) as error:
        spec.input_size(40)
    assert_names(error.value, "--image-size 40", "--repa-encoder vit_small_patch14_dinov2.lvd142m", "16")


@pytest.mark.parametrize("name", ["dinov3-vit-b", "resnet50x", "dinov2-vit-x"])
def test_unknown_encoder_is_one_line_naming_the_flag(name):
    with pytest.raises(UsageError) as error:
        describe_encoder(name)
    message = str(error.value)
    assert message.startswith(f"unknown --repa-encoder {name}: give dinov2-vit-s/b/l/g") and "\n" not in message


def test_not_a_vit_is_refused():
    with pytest.raises(UsageError, match="resnet18 is not a ViT with patch tokens"):
        describe_encoder("resnet18")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_weights_file_gives_the_vits_patch_tokens(tmp_path, suffix):
    vit = tiny_vit(init_values=1e-5)  # layer scale, as DINOv2
    path = str(tmp_path / f"encoder{suffix}")
    if suffix == ".pt":
        torch.save(vit.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(vit.state_dict(), path)
    spec = describe_encoder(path)
    assert (spec.source, spec.patch_size, spec.embed_dim) == (path, 7, 64)
    encoder = load_encoder(path, image_size=32, device=CPU)  # 32 px images -> 28 px inputs
    assert encoder.input_size == 28 and (encoder.input_size // spec.patch_size) ** 2 == 16
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    tokens = encoder.patch_tokens(images)
    assert tokens.shape == (3, 16, 64) and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, tokens_by_hand(vit, images, 28), rtol=0, atol=0)
    assert not any(param.requires_grad for param in encoder.module.parameters()) and not encoder.module.training


def test_dinov2_release_format_with_registers_loads(tmp_path):
    """DINOv2's own names (mask_token, register_tokens, the class position inside pos_embed) convert to
    timm's no_embed_class layout: the tokens equal those of the timm model they came from."""
    vit = tiny_vit(reg_tokens=4, no_embed_class=True, init_values=1e-5)
    timm_weights = vit.state_dict()
    release = {key: value for key, value in timm_weights.items() if key not in ("reg_token", "cls_token", "pos_embed")}
    class_position = torch.randn(1, 1, 64)
    release["pos_embed"] = torch.cat([class_position, timm_weights["pos_embed"]], dim=1)  # (1, 1 + 16, 64)
    release["cls_token"] = timm_weights["cls_token"] - class_position
    release["register_tokens"] = timm_weights["reg_token"]
    release["mask_token"] = torch.zeros(1, 64)
    # DINOv2's chunked layout: blocks.<chunk>.<global index>. (here each block in its own chunk)
    release = {re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.\1.", key): value for key, value in release.items()}
    assert "blocks.1.1.attn.qkv.weight" in release
    torch.testing.assert_close(timm_form(release)["cls_token"], timm_weights["cls_token"])
    path = str(tmp_path / "dinov2_release.pth")
    torch.save(release, path)
    encoder = load_encoder(path, image_size=32, device=CPU)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(encoder.patch_tokens(images), tokens_by_hand(vit, images, 28), rtol=1e-6, atol=1e-6)


def test_position_embedding_is_resampled_to_the_input_grid(tmp_path):
    """Weights of a 28 px ViT used on 64 px images (56 px inputs, 8 x 8 tokens): timm's bicubic resampling."""
    from timm.layers import resample_abs_pos_embed

    vit = tiny_vit()
    path = str(tmp_path / "encoder.pt")
    torch.save(vit.state_dict(), path)
    encoder = load_encoder(path, image_size=64, device=CPU)
    assert encoder.patch_tokens(torch.zeros(1, 3, 64, 64)).shape == (1, 64, 64)
    expected = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=(8, 8), num_prefix_tokens=1)
    torch.testing.assert_close(encoder.module.pos_embed.detach(), expected)


def test_timm_folder_loads_its_architecture(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "encoder"
    folder.mkdir()
    model_args = dict(embed_dim=32, depth=1, num_heads=2, img_size=28, patch_size=7)
    torch.manual_seed(0)
    import timm

    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **model_args).eval()
    save_file(vit.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_small_patch14_dinov2", "model_args": model_args,
                                                    "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    spec = describe_encoder(str(folder))
    assert (spec.patch_size, spec.embed_dim, spec.mean) == (7, 32, (0.5, 0.5, 0.5))
    encoder = load_encoder(str(folder), image_size=32, device=CPU)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():  # its own normalisation: (x + 1) / 2 with mean 0.5, std 0.5 is x itself
        expected = vit.forward_features(F.interpolate(images, size=(28, 28), mode="bicubic"))[:, 1:]
    torch.testing.assert_close(encoder.patch_tokens(images), expected, rtol=1e-5, atol=1e-5)


class Payload:
    """Unpickling this would create a file: a stand-in for code in a malicious checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_never_run(tmp_path):
    marker = str(tmp_path / "ran")
    path = str(tmp_path / "evil.pt")
    with open(path, "wb") as handle:
        pickle.dump({"patch_embed.proj.weight": Payload(marker)}, handle)
    with pytest.raises(UsageError) as error:
        describe_encoder(path)
    assert str(error.value).startswith(f"--repa-encoder {path}: cannot read its weights (")
    assert "\n" not in str(error.value) and not os.path.exists(marker)


def test_files_that_are_no_vit_are_refused(tmp_path):
    path = str(tmp_path / "not_a_vit.pt")
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(UsageError, match="does not hold ViT weights"):
        describe_encoder(path)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(UsageError, match="needs timm's config.json"):
        describe_encoder(str(empty))


def test_loading_an_encoder_leaves_the_training_rng_alone(tmp_path):
    path = str(tmp_path / "encoder.pt")
    torch.save(tiny_vit().state_dict(), path)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    load_encoder(path, image_size=32, device=CPU)
    assert torch.equal(torch.rand(3), expected)


#################################################################################
#               Local paths that are not there; released weights                #
#################################################################################

@pytest.mark.parametrize("name", ["./missing.pth", "/x/y.safetensors", "weights/dinov2", "missing.safetensors"])
def test_a_path_that_does_not_exist_is_no_such_file(name):
    with pytest.raises(UsageError) as error:
        describe_encoder(name)
    assert_names(error.value, f"--repa-encoder {name}", "no such file")


def test_a_named_encoder_without_network_is_one_request_and_one_line_naming_the_file(tmp_path, failing_hub,
                                                                                     monkeypatch, capfd, caplog):
    import time

    endpoint, requests = failing_hub
    hub_at(monkeypatch, tmp_path, endpoint)
    start = time.monotonic()
    with pytest.raises(UsageError) as error:
        load_encoder("dinov2-vit-s", 32, CPU)
    line = only_line(error.value, capfd.readouterr().err + caplog.text, time.monotonic() - start)
    file = "timm/vit_small_patch14_dinov2.lvd142m/resolve/main/model.safetensors"
    assert_names(line, "--repa-encoder dinov2-vit-s", f"{endpoint}/{file}", "--repa-encoder /path/to/model.safetensors")
    assert file_requests(requests) == [f"HEAD /{file}"]  # one request, no retry, nothing else fetched


def test_released_weights_in_the_hub_cache_load_without_any_request(tmp_path, failing_hub, monkeypatch):
    """timm's vit_tiny_patch16_224 with its weights (random here) where the hub's cache keeps them: built
    and loaded, the hub never asked (timm reads the file sit.hub found)."""
    import timm
    from safetensors.torch import save_file

    endpoint, requests = failing_hub
    hub_at(monkeypatch, tmp_path, endpoint)
    repo = tmp_path / "hf_cache" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    torch.manual_seed(3)
    weights = {key: value + 0.01 * torch.randn_like(value) for key, value in
               timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict().items()}
    save_file(weights, str(repo / "snapshots" / COMMIT / "model.safetensors"))
    encoder = load_encoder("vit_tiny_patch16_224", 256, CPU)  # 224 px inputs: the weights' own 14 x 14 grid
    loaded = encoder.module.state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[key], weights[key]) for key in weights)
    assert requests == []
