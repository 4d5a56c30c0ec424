"""Where SiT checkpoints come from, how they are fetched, and how they are loaded safely.

Accepted sources (`find_model`, `load_checkpoint`, `load_model`):
- the published name `SiT-XL-2-256x256.pt`: fetched once into `pretrained_models/` (relative to
  the working directory, as the original), from the Hugging Face hub first
  (`nyu-visionx/SiT-collections`), the original Dropbox link as fallback;
- `hf://<org>/<repo>/<file>`: a Hugging Face hub file, fetched into the hub's cache;
- `http(s)://...` or `file://...`: downloaded into `pretrained_models/<hash of the URL>-<file name>`;
- a local path.

Downloads stream to a temporary file beside the target, with a progress bar, and are renamed into
place only once complete: an interrupted download never leaves a complete-looking file.
Loading never runs code from the file: `torch.load(..., weights_only=True)`, which accepts tensors
and plain containers, plus `argparse.Namespace` (train.py checkpoints hold their args).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from typing import Any, Optional

import torch
from tqdm import tqdm

import models

PRETRAINED_DIR = "pretrained_models"
DEFAULT_MODEL = "SiT-XL-2-256x256.pt"
# Published name -> its sources, tried in order (the authors moved their checkpoints to the hub
# and say the Dropbox link will be retired).
PUBLISHED_MODELS = {
    DEFAULT_MODEL: [
        "hf://nyu-visionx/SiT-collections/SiT-XL-2-256.pt",
        "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
        "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0",
    ],
}
# The 512 model is on the hub too (the authors' answer in issue #42); its file name there is
# not verified from here (no network), hence no fallback.
PUBLISHED_MODELS["SiT-XL-2-512x512.pt"] = ["hf://nyu-visionx/SiT-collections/SiT-XL-2-512.pt"]
PUBLISHED_SIZES = {256: DEFAULT_MODEL, 512: "SiT-XL-2-512x512.pt"}  # image size -> published SiT-XL/2
pretrained_models = set(PUBLISHED_MODELS)  # the original's name for the set of published names
URL_SCHEMES = ("http://", "https://", "file://")
HUB_SCHEME = "hf://"
CHUNK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_S = 60
SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, fetched, loaded or matched to the requested model."""


#################################################################################
#                                   Fetching                                    #
#################################################################################

def download_url(url: str, path: str, progress: bool = True) -> str:
    """Stream `url` (http, https or file) to `path`, atomically, with a progress bar.

    The bytes go to a temporary file beside `path`, renamed to `path` only when the transfer
    is complete (and as long as the server announced). Raises CheckpointError on any failure,
    leaving nothing at `path`.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".download-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=os.path.basename(path), disable=not progress) as bar:
                while True:
                    chunk = response.read(CHUNK_BYTES)
                    if not chunk:
                        break
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise CheckpointError(f"download of {url} was interrupted: got {received} of {total} bytes")
        os.replace(tmp_path, path)
    except CheckpointError:
        _remove_quietly(tmp_path)
        raise
    except BaseException as error:  # network errors, interrupted reads, Ctrl-C: leave no partial file
        _remove_quietly(tmp_path)
        if isinstance(error, Exception):
            raise CheckpointError(f"could not download {url} ({_describe(error)})") from error
        raise
    return path


def download_hub_file(spec: str) -> str:
    """Fetch `hf://<org>/<repo>/<file>` with huggingface_hub into its cache; returns the local path."""
    repo_id, filename = parse_hub_spec(spec)
    try:
        import huggingface_hub
        return huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename)
    except Exception as error:  # offline, missing file, auth: one message for the user
        raise CheckpointError(f"could not fetch {spec} from the Hugging Face hub ({_describe(error)})") from error


def parse_hub_spec(spec: str) -> tuple[str, str]:
    """`hf://org/repo/path/file.pt` -> ("org/repo", "path/file.pt")."""
    parts = spec[len(HUB_SCHEME):].split("/", 2)
    if not spec.startswith(HUB_SCHEME) or len(parts) < 3 or not all(parts):
        raise CheckpointError(f"bad hub file {spec!r}: expected hf://<org>/<repo>/<file>")
    return f"{parts[0]}/{parts[1]}", parts[2]


def hub_web_url(spec: str) -> str:
    """The browser download link of a hub file spec."""
    repo_id, filename = parse_hub_spec(spec)
    return f"https://huggingface.co/{repo_id}/resolve/main/{filename}"


def fetch_published(name: str) -> str:
    """Local path of a published checkpoint, fetched into pretrained_models/ on first use."""
    local_path = os.path.join(PRETRAINED_DIR, name)
    if os.path.isfile(local_path):
        return local_path
    failures = []
    for source in PUBLISHED_MODELS[name]:
        try:
            if source.startswith(HUB_SCHEME):
                place_file(download_hub_file(source), local_path)
            else:
                download_url(source, local_path)
            return local_path
        except CheckpointError as error:
            failures.append(str(error))
    first = PUBLISHED_MODELS[name][0]
    link = hub_web_url(first) if first.startswith(HUB_SCHEME) else first
    raise CheckpointError(f"could not download {name}: {'; '.join(failures)}. Download it by hand (from {link}) "
                          f"and pass the local file instead: --ckpt /path/to/{name}")


def place_file(source: str, path: str) -> None:
    """Put a copy of `source` at `path` atomically: a hard link where possible, else a copy."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        os.link(os.path.realpath(source), path)
        return
    except OSError:
        pass  # other filesystem, or links unsupported: copy instead
    fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".copy-", suffix=".part")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        _remove_quietly(tmp_path)
        raise


def url_file_name(url: str) -> str:
    """The file name at the end of a URL's path ("checkpoint.pt" when it has none)."""
    return os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path)) or "checkpoint.pt"


def url_cache_name(url: str) -> str:
    """The file name a URL is cached under: `<sha1(url)[:8]>-<file name>`, so that two runs'
    `.../0400000.pt` never share a cached file."""
    return f"{hashlib.sha1(url.encode()).hexdigest()[:8]}-{url_file_name(url)}"


def fetch_url(url: str) -> str:
    """Local path of a URL's file, downloaded into pretrained_models/<url_cache_name(url)>.

    An http(s) file already there is reused (downloads are atomic, so it is complete); a
    file:// URL is copied afresh, since the file behind it may have changed. (Published names
    keep their own cache path, pretrained_models/<name>: see fetch_published.)
    """
    name = url_file_name(url)
    local_path = os.path.join(PRETRAINED_DIR, url_cache_name(url))
    if not url.startswith("file://") and os.path.isfile(local_path):
        return local_path
    try:
        return download_url(url, local_path)
    except CheckpointError as error:
        raise CheckpointError(f"{error}. Download it by hand and pass the local file instead: "
                              f"--ckpt /path/to/{name}") from error


def resolve(path_or_name: str | os.PathLike) -> str:
    """The local file behind a published name, hub file, URL or local path (fetching if needed)."""
    path_or_name = os.fspath(path_or_name)
    if path_or_name in PUBLISHED_MODELS:
        return fetch_published(path_or_name)
    if path_or_name.startswith(HUB_SCHEME):
        try:
            return download_hub_file(path_or_name)
        except CheckpointError as error:
            raise CheckpointError(f"{error}. Download it by hand and pass the local file instead: "
                                  f"--ckpt /path/to/{os.path.basename(path_or_name)}") from error
    if path_or_name.startswith(URL_SCHEMES):
        return fetch_url(path_or_name)
    return path_or_name


#################################################################################
#                                    Loading                                    #
#################################################################################

def load_checkpoint(path_or_name: str | os.PathLike) -> dict:
    """The raw checkpoint dict (train.py's {"model", "ema", "opt", "args", ...} or a state dict).

    Fetches published names, hub files and URLs first. Never runs code from the file.
    Raises CheckpointError when the file is missing, is not a checkpoint, or holds objects
    that only a full (code-executing) unpickler could build.
    """
    path = resolve(path_or_name)
    if not os.path.exists(path):
        raise CheckpointError(f"no SiT checkpoint at {path}: pass a local .pt file, a published name "
                              f"({', '.join(PUBLISHED_MODELS)}), an http(s)/file URL or hf://<org>/<repo>/<file>")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty, not a checkpoint (an interrupted copy?)")
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def safe_torch_load(path: str) -> Any:
    """torch.load with weights_only=True (plus argparse.Namespace), errors made one-line."""
    try:
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True)
        torch.serialization.add_safe_globals(SAFE_GLOBALS)  # torch 2.4 has no context manager
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        refused = _refused_object(str(error))
        if refused:
            raise CheckpointError(f"refused to load {path}: it holds Python objects other than tensors and plain "
                                  f"containers ({refused}), and unpickling them could run code from the file. "
                                  f"Load it only if you trust its source, and save its state dict alone") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated, corrupt or another "
                              f"kind of file): {_describe(error)}") from None


def find_model(model_name: str | os.PathLike) -> dict:
    """A state dict for `model_name` (published name, hub file, URL or local path).

    Train checkpoints yield their EMA weights (their raw weights if they have no EMA); a bare
    state dict is returned as is.
    """
    return state_dict_of(load_checkpoint(model_name))


def state_dict_of(checkpoint: dict) -> dict:
    """The weights to sample with: "ema" from train checkpoints, else "model", else the dict itself."""
    for key in ("ema", "model"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    return checkpoint


#################################################################################
#                           Building a model for a checkpoint                   #
#################################################################################

def load_model(ckpt: Optional[str], model_name: Optional[str] = None, image_size: Optional[int] = None,
               num_classes: Optional[int] = None) -> tuple[models.SiT, dict]:
    """The SiT a checkpoint holds, in eval mode with its (EMA) weights, and what it knows about itself.

    ckpt: published name, hub file, URL or path; None means the published SiT-XL/2 at image_size
    (256 by default, or 512).
    model_name / image_size / num_classes: what the user asked for, or None to take the
    checkpoint's; a contradiction raises CheckpointError naming both.
    Returns (model on the CPU, info) with info = {"model_name", "image_size", "num_classes",
    "in_channels", "pixel_space", "vae", "transport"}; "vae" and "transport" (path_type, prediction, loss_weight,
    train_eps, sample_eps, those the args hold) come from the checkpoint's args, None without.
    """
    source = published_model(model_name, image_size, num_classes) if ckpt is None else ckpt
    checkpoint = load_checkpoint(source)
    state_dict = state_dict_of(checkpoint)
    args = _args_dict(checkpoint.get("args"))
    config = _model_config(checkpoint, state_dict, source)
    info = _checkpoint_info(config, args)
    _check_request(info, config, model_name, image_size, num_classes)
    model = models.SiT(**config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in lines[1:3])[:300]  # skip "Error(s) in loading state_dict"
        raise CheckpointError(f"the weights in {source} do not fit the model they describe: {detail}") from None
    return model.eval(), info


def published_model(model_name: Optional[str], image_size: Optional[int], num_classes: Optional[int]) -> str:
    """The published checkpoint for a request without --ckpt, refused before any download when none fits."""
    if model_name not in (None, "SiT-XL/2"):
        raise CheckpointError(f"only SiT-XL/2 is published (asked for --model {model_name}); pass --ckpt /path/to/model.pt")
    if image_size is not None and image_size not in PUBLISHED_SIZES:
        sizes = ", ".join(map(str, PUBLISHED_SIZES))
        raise CheckpointError(f"no published model at --image-size {image_size} (published: {sizes}); pass --ckpt")
    if num_classes not in (None, 1000):
        raise CheckpointError(f"the published models have 1000 classes (asked for --num-classes {num_classes}); pass --ckpt")
    return PUBLISHED_SIZES[image_size or 256]


def _model_config(checkpoint: dict, state_dict: dict, source: str) -> dict:
    """SiT constructor kwargs: the stored "model_config", else read from the parameter shapes."""
    if isinstance(checkpoint.get("model_config"), dict):
        return dict(checkpoint["model_config"])
    try:
        return models.model_config_from_state_dict(state_dict)
    except (ValueError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{source} does not hold SiT weights ({error})") from None


def _args_dict(args: Any) -> dict:
    """The checkpoint's training args as a dict (Namespace or dict; empty when absent)."""
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def _checkpoint_info(config: dict, args: dict) -> dict:
    """What the checkpoint says about itself: name, image size, classes, channels, VAE, transport."""
    vae = args.get("vae")
    pixel_space = vae == "none" or config["in_channels"] == 3
    transport_keys = ("path_type", "prediction", "loss_weight", "train_eps", "sample_eps")
    # only the settings the args hold: a missing key means "unknown", not None
    transport = {key: args[key] for key in transport_keys if key in args} or None
    return {
        "model_name": models.model_name_for_config(config),
        "image_size": config["input_size"] if pixel_space else config["input_size"] * 8,  # SD-VAE: 8x downsampling
        "num_classes": config["num_classes"],
        "in_channels": config["in_channels"],
        "pixel_space": pixel_space,
        "vae": vae,
        "transport": transport,
    }


def _check_request(info: dict, config: dict, model_name: Optional[str], image_size: Optional[int],
                   num_classes: Optional[int]) -> None:
    """Raise CheckpointError when the user's flags contradict the checkpoint."""
    held = (f"{info['model_name'] or 'a custom SiT'} (depth {config['depth']}, width {config['hidden_size']}, "
            f"patch {config['patch_size']})")
    if model_name is not None:
        if model_name not in models.SiT_models:
            raise CheckpointError(f"unknown --model {model_name!r}; choose one of {', '.join(models.SiT_models)}")
        depth, hidden_size, patch_size, _ = models.MODEL_SHAPES[model_name]
        if (depth, hidden_size, patch_size) != (config["depth"], config["hidden_size"], config["patch_size"]):
            raise CheckpointError(f"--model {model_name} but the checkpoint holds {held}")
    if image_size is not None and image_size % 8 and not info["pixel_space"]:
        raise CheckpointError(f"--image-size must be a multiple of 8 for latent models (the VAE downsamples by 8), "
                              f"got {image_size}; the checkpoint is a latent model trained at {info['image_size']}")
    if image_size is not None and image_size != info["image_size"]:
        raise CheckpointError(f"--image-size {image_size} but the checkpoint was trained at {info['image_size']}")
    if num_classes is not None and num_classes != info["num_classes"]:
        raise CheckpointError(f"--num-classes {num_classes} but the checkpoint has {info['num_classes']} classes")


#################################################################################
#                                    Helpers                                    #
#################################################################################

def _refused_object(message: str) -> Optional[str]:
    """The object a weights-only load refused (e.g. 'GLOBAL posix.mkdir'), or None for other errors."""
    match = re.search(r"(?:unsupported|Unsupported global:)\s*(GLOBAL\s+[\w.]+)", message)
    return match.group(1) if match else None


def _describe(error: BaseException) -> str:
    """`Type: the gist of the message`, short enough for one line."""
    message = str(error)
    if "Weights only load failed" in message:  # torch's boilerplate; keep only what it tripped on
        detail = re.search(r"(Unsupported operand \d+|Unsupported [^\n]+)", message)
        message = detail.group(1) if detail else "not a file torch.save wrote"
    lines = message.strip().splitlines()
    first = lines[0] if lines else ""
    first = re.split(r"(?<=\.) ", first, maxsplit=1)[0][:160]  # first sentence
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
