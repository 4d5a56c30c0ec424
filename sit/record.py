"""The record beside a sample batch, `samples/<folder>.json` next to `<folder>.npz`: every setting that shaped
its images (`SampleRecord`) and the SHA-256 of the .npz's arrays. sample_ddp.py writes it after the .npz;
evaluate.py reads it (`record_beside`), refuses one that disagrees with the .npz and copies it into its --json
output. A record from before the hashes existed is read as unverified (its count and shape checked)."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import zipfile
from dataclasses import dataclass, field
from typing import Any, Optional

from sit.archives import read_npy_header
from sit.errors import UsageError
from sit.files import atomic_json, sha256_of

RECORD_FORMAT = "sit-sample-record"
RECORD_VERSION = 1
HASH_FIELDS = ("images_sha256", "labels_sha256")  # the .npz's arrays, as npz_array_sha256 hashes them
# absent from records that lack them
OMITTED_WHEN_NONE = ("guide_checkpoint", "guide_checkpoint_sha256", *HASH_FIELDS, "label_sampling")
VERSIONED_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "diffusers", "timm", "torchdiffeq", "torch-fidelity")


class RecordError(UsageError):
    """A sample record that cannot be read, is not one, or disagrees with its .npz; the message names the file."""


@dataclass
class SampleRecord:
    """Every setting that shapes a sample batch's images (None where a setting does not apply)."""
    checkpoint: Optional[str]  # as given: path, URL, hf:// file or published name
    checkpoint_sha256: Optional[str]  # of the file loaded (64 hex digits)
    model: str  # "SiT-XL/2", or "custom (depth D, width W, patch P)"
    image_size: int
    num_classes: int
    vae: str  # "ema", "mse", "none" (pixel space) or a local VAE folder (absolute path)
    mode: str  # "ODE" or "SDE"
    sampling_method: str  # e.g. "dopri5", "heun2", "Euler"
    num_sampling_steps: int  # as asked (adaptive solvers choose their own)
    nfe: Optional[int]  # model evaluations actually used per image (guided pairs count once), when known
    cfg_scale: float
    guided_channels: Optional[int]  # latent channels classifier-free guidance applies to; None without guidance
    guidance_interval: Optional[tuple[float, float]]  # t-range where guidance applies; None: everywhere
    precision: str  # "fp32", "tf32", "bf16" or "fp16"
    global_seed: int
    label_draw: str  # how labels were chosen, e.g. "uniform over 1000 classes, seeded per image index"
    num_images: int  # images in the .npz
    image_shape: tuple[int, int, int]  # (H, W, 3) of each image
    sampler_settings: dict[str, Any] = field(default_factory=dict)  # the rest: tolerances, SDE form, eps, ...
    versions: dict[str, str] = field(default_factory=dict)  # package_versions() of the sampling run
    # Optional in a record (older records lack them):
    checkpoint_file: Optional[str] = None  # the local file loaded (absolute), whose bytes checkpoint_sha256 hashes
    vae_sha256: Optional[str] = None  # of a local VAE folder's files (sit.files.folder_sha256); None for hub VAEs
    nfe_measured: dict[str, Any] = field(default_factory=dict)  # per-batch model evaluations this run measured
    batch_size: Optional[int] = None  # images sampled as one batch (sample_ddp.py's --per-proc-batch-size)
    world_size: Optional[int] = None  # processes of the run that wrote the record
    preset: Optional[str] = None  # sample_ddp.py --preset NAME, if one filled flags
    # Autoguidance only (absent from records without it): the guide model, --guide-ckpt as given, and its file's hash
    guide_checkpoint: Optional[str] = None
    guide_checkpoint_sha256: Optional[str] = None
    # The .npz this record describes (absent from older records): SHA-256 of arr_0's and of labels' bytes as
    # stored (npz_array_sha256); evaluate.py refuses a record whose hashes are not those of the .npz beside it
    images_sha256: Optional[str] = None
    labels_sha256: Optional[str] = None
    # sample_ddp.py --label-sampling balanced (absent: random, the per-image uniform draw label_draw describes)
    label_sampling: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: format, version, the fields (tuples as lists; OMITTED_WHEN_NONE only when set)."""
        fields = json.loads(json.dumps(dataclasses.asdict(self)))
        for key in OMITTED_WHEN_NONE:
            if fields[key] is None:
                del fields[key]
        return {"format": RECORD_FORMAT, "version": RECORD_VERSION, **fields}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "SampleRecord":
        """A record from its JSON object; RecordError naming `source` for anything else."""
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise RecordError(f"{source} is not a sample record (no \"format\": \"{RECORD_FORMAT}\")")
        if data.get("version") != RECORD_VERSION:
            raise RecordError(f"{source} is a sample record of version {data.get('version')!r}; "
                              f"this code reads version {RECORD_VERSION}")
        fields = {key: value for key, value in data.items() if key not in ("format", "version")}
        missing = [item.name for item in dataclasses.fields(cls) if item.name not in fields
                   and item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING]
        unknown = sorted(set(fields) - {item.name for item in dataclasses.fields(cls)})
        if missing or unknown:
            problem = f"lacks {', '.join(missing)}" if missing else f"has unknown fields {', '.join(unknown)}"
            raise RecordError(f"{source} {problem}")
        shape = fields["image_shape"]
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(side, int) for side in shape)):
            raise RecordError(f"{source}: image_shape must be [H, W, 3], got {shape!r}")
        if not isinstance(fields["num_images"], int) or fields["num_images"] < 0:
            raise RecordError(f"{source}: num_images must be a count, got {fields['num_images']!r}")
        interval = fields.get("guidance_interval")
        return cls(**{**fields, "image_shape": tuple(shape), "guidance_interval": interval and tuple(interval)})

    def check_against(self, num_images: int, image_shape: tuple[int, ...], source: str, npz_path: str) -> None:
        """RecordError (one line) unless the .npz holds the images the record describes."""
        if num_images != self.num_images or tuple(image_shape) != tuple(self.image_shape):
            raise RecordError(f"{source} describes {self.num_images} images of {format_shape(self.image_shape)} but "
                              f"{npz_path} holds {num_images} of {format_shape(image_shape)}: the record belongs "
                              f"to another batch (pass --ignore-record to evaluate without it)")

    def check_hashes(self, source: str, npz_path: str) -> None:
        """RecordError (one line) unless the record's hashes, if any (older records lack them), are the .npz's."""
        if self.images_sha256 is None:
            return
        arrays = (("images", "arr_0", self.images_sha256), ("labels", LABELS_KEY, self.labels_sha256))
        for what, key, recorded in arrays:
            if recorded is None:
                continue
            actual = npz_array_sha256(npz_path, key)
            if actual != recorded:
                held = f"{actual[:12]}..." if actual is not None else "none"
                raise RecordError(f"{source} does not describe {npz_path}: it records {what} of SHA-256 "
                                  f"{recorded[:12]}... but the .npz holds {held}: the record belongs to other "
                                  f"images (pass --ignore-record to evaluate without it)")


LABELS_KEY = "labels"  # the .npz's class labels beside arr_0 (sit.sampling.folder)


def npz_array_sha256(npz_path: str, key: str = "arr_0") -> Optional[str]:
    """SHA-256 (hex) of the bytes an .npz stores for array `key` after its .npy header (for a C-order array:
    of array.tobytes()), streamed; None when the .npz holds no such array."""
    with zipfile.ZipFile(npz_path) as archive:
        if f"{key}.npy" not in archive.namelist():
            return None
        with archive.open(f"{key}.npy") as stream:
            read_npy_header(stream)
            return sha256_of(stream)


def npz_hashes(npz_path: str) -> dict[str, Optional[str]]:
    """The HASH_FIELDS of an .npz: images_sha256 (arr_0) and labels_sha256 (None without labels)."""
    return {"images_sha256": npz_array_sha256(npz_path, "arr_0"),
            "labels_sha256": npz_array_sha256(npz_path, LABELS_KEY)}


def format_shape(shape: tuple[int, ...]) -> str:
    """(256, 256, 3) -> "256x256x3"."""
    return "x".join(str(side) for side in shape)


def record_path(npz_path: str) -> str:
    """samples/<folder>.npz -> samples/<folder>.json"""
    root, extension = os.path.splitext(npz_path)
    return (root if extension == ".npz" else npz_path) + ".json"


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape samples and metrics (those installed)."""
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions


def write_record(npz_path: str, record: SampleRecord) -> str:
    """Write `record` beside the .npz (atomically); returns the record's path."""
    atomic_json(record_path(npz_path), record.to_dict())
    return record_path(npz_path)


def read_record(path: str) -> SampleRecord:
    """The record in a JSON file; RecordError (one line) for a file that is not one."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise RecordError(f"cannot read the sample record {path} ({type(error).__name__}: {error})") from None
    return SampleRecord.from_dict(data, path)


def record_beside(npz_path: str, num_images: int, image_shape: tuple[int, ...]) -> Optional[SampleRecord]:
    """The record beside a .npz holding `num_images` images of `image_shape` (H, W, 3), or None without one;
    RecordError when it is unreadable or describes another batch (count, shape or, if recorded, hashes)."""
    path = record_path(npz_path)
    if not os.path.isfile(path):
        return None
    record = read_record(path)
    record.check_against(num_images, image_shape, path, npz_path)
    record.check_hashes(path, npz_path)
    return record
