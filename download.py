"""Where SiT checkpoints come from (a published name, `hf://<org>/<repo>/<file>`, an http(s)/file URL or a
local path: docs/sampling.md), how they are fetched (atomically, into `pretrained_models/` or the hub's
cache), and how they are loaded without running code from the file (weights_only, plus argparse.Namespace).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import shutil
import urllib.parse
from typing import Any, Optional

import torch

from sit.archives import zip_problem
from sit.errors import UsageError
from sit.files import atomic_write, removed_on_failure_if_empty
from sit.hub import HubUnavailable, hub_file, hub_offline, url_download

PRETRAINED_DIR = "pretrained_models"
DEFAULT_MODEL = "SiT-XL-2-256x256.pt"
# Published name -> its sources, tried in order (hub names other than XL/2 256's unverified: SiT-XL-2-512.pt
# is the authors' answer in issue #42; S/B/L 256 as public code spells them. SiT-S-2-256.pt: revision
# 9a43ddf08f80ac7f3525208ce72943e98fe98343, 131,893,962 bytes, sha256
# a245dc6330cd0d5906a5da00718b7d348a417d740e6b6cfeeb504e9d1448d070, a bare state dict of 1001 class rows).
PUBLISHED_MODELS = {
    DEFAULT_MODEL: [
        "hf://nyu-visionx/SiT-collections/SiT-XL-2-256.pt",
        "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
        "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0",
    ],
    "SiT-XL-2-512x512.pt": ["hf://nyu-visionx/SiT-collections/SiT-XL-2-512.pt"],
    **{name: [f"hf://nyu-visionx/SiT-collections/{name}"] for name in ("SiT-S-2-256.pt", "SiT-B-2-256.pt",
                                                                       "SiT-L-2-256.pt")},
}
# (--model, image size) -> its published checkpoint, for requests without --ckpt.
PUBLISHED_CHECKPOINTS = {("SiT-XL/2", 256): DEFAULT_MODEL, ("SiT-XL/2", 512): "SiT-XL-2-512x512.pt",
                         ("SiT-L/2", 256): "SiT-L-2-256.pt", ("SiT-B/2", 256): "SiT-B-2-256.pt",
                         ("SiT-S/2", 256): "SiT-S-2-256.pt"}
pretrained_models = set(PUBLISHED_MODELS)  # the original's name for the set of published names
URL_SCHEMES = ("http://", "https://", "file://")
HUB_SCHEME = "hf://"
SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(UsageError):
    """A checkpoint that cannot be found, fetched, loaded or matched to the requested model."""


def download_url(url: str, path: str, progress: bool = True) -> str:
    """sit.hub.url_download, its failures a CheckpointError (NoSpaceLeft for a full disk)."""
    try:
        return url_download(url, path, progress)
    except HubUnavailable as error:  # network errors, interrupted reads: one message for the user
        raise CheckpointError(str(error)) from error


def download_hub_file(spec: str) -> str:
    """The local path of `hf://<org>/<repo>/<file>`: cached, or fetched by sit.hub.hub_file."""
    repo_id, filename = parse_hub_spec(spec)
    try:
        return hub_file(repo_id, filename)
    except HubUnavailable as error:  # offline, missing file, auth: one message for the user
        raise CheckpointError(f"could not fetch {spec} from the Hugging Face hub: {error}") from None


def parse_hub_spec(spec: str) -> tuple[str, str]:
    """`hf://org/repo/path/file.pt` -> ("org/repo", "path/file.pt")."""
    parts = spec[len(HUB_SCHEME):].split("/", 2)
    if not spec.startswith(HUB_SCHEME) or len(parts) < 3 or not all(parts):
        raise CheckpointError(f"bad hub file {spec!r}: expected hf://<org>/<repo>/<file>")
    return f"{parts[0]}/{parts[1]}", parts[2]


def fetch_published(name: str) -> str:
    """Local path of a published checkpoint, fetched into pretrained_models/ on first use."""
    local_path = os.path.join(PRETRAINED_DIR, name)
    if os.path.isfile(local_path):
        return local_path
    failures = []  # each source in turn; CheckpointError naming them all when none works
    with removed_on_failure_if_empty([PRETRAINED_DIR], enabled=not os.path.isdir(PRETRAINED_DIR)):
        for source in PUBLISHED_MODELS[name]:
            if hub_offline() and not source.startswith(HUB_SCHEME):
                failures.append(f"{source.split('?')[0]} not tried (HF_HUB_OFFLINE is set)")
                continue
            try:
                if source.startswith(HUB_SCHEME):
                    place_file(download_hub_file(source), local_path)
                else:
                    download_url(source, local_path)
                return local_path
            except CheckpointError as error:
                failures.append(str(error))
        first = PUBLISHED_MODELS[name][0]
        link = (f"https://huggingface.co/{'/resolve/main/'.join(parse_hub_spec(first))}"
                if first.startswith(HUB_SCHEME) else first)
        raise CheckpointError(f"could not download {name}: {'; '.join(failures)}. Download it by hand (from {link}) "
                              f"and pass the local file instead: --ckpt /path/to/{name}")


def place_file(source: str, path: str) -> None:
    """Put a copy of `source` at `path` atomically: a hard link where possible, else a copy."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        os.link(os.path.realpath(source), path)
    except OSError:  # other filesystem, or links unsupported: copy instead
        atomic_write(path, functools.partial(shutil.copyfile, source), suffix=".part")


def url_file_name(url: str) -> str:
    """The file name at the end of a URL's path ("checkpoint.pt" when it has none)."""
    return os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path)) or "checkpoint.pt"


def url_cache_name(url: str) -> str:
    """The file name a URL is cached under: `<sha1(url)[:8]>-<file name>`, so that two runs'
    `.../0400000.pt` never share a cached file."""
    return f"{hashlib.sha1(url.encode()).hexdigest()[:8]}-{url_file_name(url)}"


def by_hand(error: CheckpointError, name: str) -> CheckpointError:
    """A fetch failure with the advice to download the file by hand and pass it instead."""
    return CheckpointError(f"{error}. Download it by hand and pass the local file instead: --ckpt /path/to/{name}")


def fetch_url(url: str) -> str:
    """Local path of a URL's file in pretrained_models/<url_cache_name(url)>: an http(s) file there is
    reused (downloads are atomic), a file:// URL copied afresh (its file may have changed)."""
    local_path = os.path.join(PRETRAINED_DIR, url_cache_name(url))
    if not url.startswith("file://") and os.path.isfile(local_path):
        return local_path
    try:
        with removed_on_failure_if_empty([PRETRAINED_DIR], enabled=not os.path.isdir(PRETRAINED_DIR)):
            return download_url(url, local_path)
    except CheckpointError as error:
        raise by_hand(error, url_file_name(url)) from error


def resolve(path_or_name: str | os.PathLike) -> str:
    """The local file behind a published name, hub file, URL or local path (fetching if needed)."""
    path_or_name = os.fspath(path_or_name)
    if path_or_name in PUBLISHED_MODELS:
        return fetch_published(path_or_name)
    if path_or_name.startswith(HUB_SCHEME):
        try:
            return download_hub_file(path_or_name)
        except CheckpointError as error:
            raise by_hand(error, os.path.basename(path_or_name)) from error
    if path_or_name.startswith(URL_SCHEMES):
        return fetch_url(path_or_name)
    return path_or_name


def local_copy(path_or_name: str | os.PathLike) -> Optional[str]:
    """The local file (absolute path) resolve would give, without fetching anything, or None."""
    path_or_name = os.fspath(path_or_name)
    if path_or_name in PUBLISHED_MODELS:
        candidate: Any = os.path.join(PRETRAINED_DIR, path_or_name)
    elif path_or_name.startswith(HUB_SCHEME):
        try:
            import huggingface_hub
            candidate = huggingface_hub.try_to_load_from_cache(*parse_hub_spec(path_or_name))
        except Exception:  # no huggingface_hub, or a cache it cannot read: nothing known
            return None
    elif path_or_name.startswith(URL_SCHEMES):
        candidate = os.path.join(PRETRAINED_DIR, url_cache_name(path_or_name))
    else:
        candidate = path_or_name
    return os.path.abspath(candidate) if isinstance(candidate, str) and os.path.isfile(candidate) else None


def load_checkpoint(path_or_name: str | os.PathLike) -> dict:
    """The raw checkpoint dict (train.py's {"model", "ema", "opt", "args", ...} or a state dict), fetched
    first if needed; CheckpointError when it is missing, not a checkpoint, or holds more than weights."""
    path = resolve(path_or_name)
    if not os.path.exists(path):
        raise CheckpointError(f"no SiT checkpoint at {path}: pass a local .pt file, a published name "
                              f"({', '.join(PUBLISHED_MODELS)}), an http(s)/file URL or hf://<org>/<repo>/<file>")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty, not a checkpoint (an interrupted copy?)")
    problem = zip_problem(path, whole_in_memory=True)  # judged from the central directory, before inflating
    if problem is not None:
        raise CheckpointError(f"refused to load {path}: {problem}")
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
        refused = re.search(r"(?:unsupported|Unsupported global:)\s*(GLOBAL\s+[\w.]+)", str(error))
        if refused:
            raise CheckpointError(f"refused to load {path}: it holds Python objects other than tensors and plain "
                                  f"containers ({refused.group(1)}), and unpickling them could run code from the file. "
                                  f"Load it only if you trust its source, and save its state dict alone") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated, corrupt or another "
                              f"kind of file): {_describe(error)}") from None


def check_source(name: str, value: Any, optional: bool = False) -> None:
    """TypeError naming the argument unless value is a str or os.PathLike (or, optional, None)."""
    if (value is None and optional) or isinstance(value, (str, os.PathLike)):
        return
    expected = "a published name, URL or path (str or os.PathLike)" + (", or None" if optional else "")
    raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def find_model(model_name: str | os.PathLike) -> dict:
    """A state dict for `model_name` (published name, hub file, URL or local path): a train checkpoint's EMA
    weights (else its raw ones), a bare state dict as is."""
    check_source("find_model(model_name)", model_name)
    return state_dict_of(load_checkpoint(model_name))


def state_dict_of(checkpoint: dict) -> dict:
    """The weights to sample with: "ema" from train checkpoints, else "model", else the dict itself."""
    for key in ("ema", "model"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    return checkpoint


def published_model(model_name: Optional[str], image_size: Optional[int], num_classes: Optional[int]) -> str:
    """The published checkpoint for a request without --ckpt (--model default SiT-XL/2, --image-size
    default 256), refused before any download when none fits."""
    model_name = model_name or "SiT-XL/2"
    sizes = sorted(size for model, size in PUBLISHED_CHECKPOINTS if model == model_name)
    if not sizes:
        published = ", ".join(dict.fromkeys(model for model, _ in PUBLISHED_CHECKPOINTS))
        raise CheckpointError(f"no published checkpoint of --model {model_name} (published: {published}); "
                              f"pass --ckpt /path/to/model.pt")
    if image_size is not None and image_size not in sizes:
        raise CheckpointError(f"no published model at --image-size {image_size} for {model_name} (published: "
                              f"{', '.join(map(str, sizes))}); pass --ckpt")
    if num_classes not in (None, 1000):
        raise CheckpointError(f"the published models have 1000 classes (asked for --num-classes {num_classes}); "
                              f"pass --ckpt")
    return PUBLISHED_CHECKPOINTS[(model_name, image_size or 256)]


def _describe(error: BaseException) -> str:
    """`Type: the gist of the message`, short enough for one line."""
    message = str(error)
    if "Weights only load failed" in message:  # torch's boilerplate; keep only what it tripped on
        detail = re.search(r"(Unsupported operand \d+|Unsupported [^\n]+)", message)
        message = detail.group(1) if detail else "not a file torch.save wrote"
    first = (message.strip().splitlines() or [""])[0]
    first = re.split(r"(?<=\.) ", first, maxsplit=1)[0][:160]  # first sentence
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
