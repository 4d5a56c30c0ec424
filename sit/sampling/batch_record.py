"""sample_ddp.py's record beside `<folder>.npz` (a `sit.record.SampleRecord` in `<folder>.json`): the
settings, the source files' and the arrays' SHA-256 and the measured NFE. `claim_sample_folder` refuses a
rerun whose weights or settings differ from `<folder>/settings.json`; `finish_sample_batch` writes the .npz
and the record."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

import download
from sit.errors import UsageError, reported_as
from sit.files import atomic_json, folder_sha256, sha256_file
from sit.latents import LATENT_SPACES, PIXEL_SPACE
from sit.record import (HASH_FIELDS, RecordError, SampleRecord, npz_hashes, package_versions, read_record,
                        record_path, write_record)
from sit.sampling.folder import FOLDER_SETTINGS, check_space_for_samples, finish_npz, npz_shape
from sit.sampling.loading import SamplingModel
from sit.sampling.settings import ModelSettings, SamplingConfig

# What a rerun may differ in and still describe the same images (an earlier record of them is kept):
# the checkpoints as given (the same file may be named another way; its hash is compared) and the preset.
NOT_SHAPING_IMAGES = ("nfe", "nfe_measured", "versions", "world_size", "checkpoint", "preset", "guide_checkpoint")
# ... and what a folder's settings record leaves out besides: how many images (a rerun may add more),
# their shape (known once sampled) and where the checkpoint file lies (its hash is compared).
NOT_SHAPING_FOLDER = NOT_SHAPING_IMAGES + ("num_images", "image_shape", "checkpoint_file") + HASH_FIELDS


@dataclass(frozen=True)
class SampleSources:
    """The files a sample batch comes from: the checkpoint as given and its local file, and the VAE."""
    checkpoint: str  # --ckpt as given, or the published model's name
    checkpoint_file: Optional[str]  # absolute path; None when its local copy cannot be found
    checkpoint_sha256: Optional[str]
    vae: str  # a table entry of sit.latents ("ema", "mse", "none", ...) or a local folder (absolute)
    vae_sha256: Optional[str]  # of a local VAE folder's files (sit.files.folder_sha256)
    guide: Optional[str] = None  # --guide-ckpt as given (autoguidance)
    guide_sha256: Optional[str] = None  # of its local file


def check_earlier_record(folder: str, checkpoint: str, checkpoint_sha256: Optional[str], flag: str = "--ckpt",
                         field: str = "checkpoint_sha256") -> None:
    """UsageError when the record beside <folder>.npz names other weights than `checkpoint_sha256` (in
    its `field`; flag: how the message names the checkpoint)."""
    path = record_path(f"{folder}.npz")
    if checkpoint_sha256 is None or not os.path.isfile(path):
        return
    try:
        earlier = read_record(path)
    except RecordError:
        return  # not a record this code reads: replaced when the batch is finished
    earlier_sha256 = getattr(earlier, field)
    if earlier_sha256 not in (None, checkpoint_sha256):
        raise UsageError(f"{flag} {checkpoint} now holds other weights (sha256 {checkpoint_sha256[:12]}...) than "
                         f"those the images in {folder} were sampled from ({earlier_sha256[:12]}..., per "
                         f"{path}): move {folder} and its .npz and .json away, or pass another --sample-dir")


def identify_sources(config: SamplingConfig, settings: ModelSettings, folder: str, logger: Any) -> SampleSources:
    """The checkpoint's and VAE's identity (files hashed once, on rank 0); see check_earlier_record."""
    def hashed(path: Optional[str], hash_of: Callable[[str], str] = sha256_file, what: str = "") -> Optional[str]:
        with reported_as(f"cannot read {what or path} to hash it"):
            return None if path is None else hash_of(path)

    request = config.request  # --ckpt, or the name of the published checkpoint a request without it loads
    checkpoint = request.ckpt if request.ckpt is not None else download.published_model(
        request.model_name, request.image_size, request.num_classes)
    local_file = download.local_copy(checkpoint)
    if local_file is None:
        logger.warning(f"cannot find the local file of {checkpoint}: its record will have no checkpoint hash")
    checkpoint_sha256 = hashed(local_file)
    check_earlier_record(folder, checkpoint, checkpoint_sha256)
    vae = PIXEL_SPACE if settings.vae is None else settings.vae
    local_vae = vae not in LATENT_SPACES  # a folder, hashed; a table entry is its name
    vae_sha256 = hashed(vae if local_vae else None, sha256_file if os.path.isfile(vae) else folder_sha256,
                        f"the VAE {vae}")  # a folder, or a checkpoint file (sit.latents.LATENT_FILES)
    guide = config.guidance.guide_ckpt
    guide_sha256 = hashed(download.local_copy(guide) if guide is not None else None)
    check_earlier_record(folder, guide, guide_sha256, flag="--guide-ckpt", field="guide_checkpoint_sha256")
    return SampleSources(checkpoint, local_file, checkpoint_sha256, os.path.abspath(vae) if local_vae else vae,
                         vae_sha256, guide, guide_sha256)


def folder_settings(config: SamplingConfig, loaded: SamplingModel, sources: SampleSources) -> dict[str, Any]:
    """What shapes a folder's images: a SampleRecord's fields less NOT_SHAPING_FOLDER."""
    size = loaded.settings.image_size
    record = build_record(config, loaded, sources, [], 1, None, (0, size, size, 3)).to_dict()
    return {key: value for key, value in record.items() if key not in NOT_SHAPING_FOLDER}


def settings_difference(earlier: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys whose values differ ("key: was X, now Y"); a checkpoint hash counts only where both runs know it."""
    differences = []
    for key in sorted(set(earlier) | set(now)):
        before, after = earlier.get(key), now.get(key)
        if key == "checkpoint_sha256" and None in (before, after):
            continue
        if before != after:
            differences.append(f"{key}: was {before!r:.60}, now {after!r:.60}")
    return differences


def claim_sample_folder(config: SamplingConfig, loaded: SamplingModel, folder: str, logger: Any) -> SampleSources:
    """Rank 0, before sampling: the sources (identify_sources), then <folder>/settings.json checked against
    this run (UsageError naming what differs) or written, then the free space checked. Returns the sources."""
    sources = identify_sources(config, loaded.settings, folder, logger)
    settings, path = folder_settings(config, loaded, sources), os.path.join(folder, FOLDER_SETTINGS)
    earlier = None
    if os.path.isfile(path):
        with reported_as(f"cannot read {path}"), open(path) as handle, contextlib.suppress(ValueError):
            earlier = json.load(handle)  # a damaged record stays None: rewritten below
    if isinstance(earlier, dict):
        differences = settings_difference(earlier, settings)
        if differences:
            raise UsageError(f"{folder} holds images made with other settings or weights ({'; '.join(differences)}); "
                             f"pass the same flags and --ckpt, or another --sample-dir")
    else:
        with reported_as(f"cannot write {path}"):
            atomic_json(path, settings)
    check_space_for_samples(folder, config.num_images, loaded.settings.image_size)
    return sources


def summarise_nfe(per_rank: Sequence[Sequence[tuple[int, int]]], num_images: int) -> tuple[Optional[int], dict]:
    """(model evaluations per image, or None unless one count holds for every image of the batch; the
    measured counts). per_rank: each rank's (PNGs written, model evaluations) per batch it sampled."""
    batches = [batch for rank in per_rank for batch in rank]
    images = sum(written for written, _ in batches)
    counts = [count for _, count in batches]
    measured: dict[str, Any] = {"batches": len(batches), "images": images, "images_not_measured": num_images - images}
    if counts:
        measured.update(per_batch_min=min(counts), per_batch_max=max(counts), total=sum(counts))
    same_everywhere = bool(counts) and min(counts) == max(counts) and images == num_images
    return (counts[0] if same_everywhere else None), measured


def model_description(settings: ModelSettings, model_config: dict) -> str:
    """"SiT-XL/2", or "custom (depth D, width W, patch P)" for a checkpoint of no named size."""
    if not settings.name.startswith("custom"):  # custom-d<depth>-w<width>-p<patch> (sit.checkpoint.model_shape_name)
        return settings.name
    return (f"custom (depth {model_config['depth']}, width {model_config['hidden_size']}, "
            f"patch {model_config['patch_size']})")


def build_record(config: SamplingConfig, loaded: SamplingModel, sources: SampleSources,
                 per_rank_nfe: Sequence[Sequence[tuple[int, int]]], world_size: int, preset: Optional[str],
                 npz_shape_: tuple[int, ...]) -> SampleRecord:
    """The record of a finished batch whose .npz holds arr_0 of `npz_shape_` (N, H, W, 3)."""
    settings, model_config = loaded.settings, loaded.model.config
    sampler, guidance = config.sampler, config.guidance
    guided = guidance.scale > 1.0
    nfe, measured = summarise_nfe(per_rank_nfe, npz_shape_[0])
    sampler_settings = sampler.record_settings()  # the sampler family's own settings
    sampler_settings.update(dataclasses.asdict(settings.transport), compile=config.compile,
                            noise_draw="per image: standard normal on a CPU generator seeded by (global seed, index), "
                                       "before its label; SDE noise per batch, seeded by its first index")
    return SampleRecord(
        checkpoint=sources.checkpoint, checkpoint_sha256=sources.checkpoint_sha256,
        model=model_description(settings, model_config), image_size=settings.image_size,
        num_classes=settings.num_classes, vae=sources.vae, mode=sampler.mode, sampling_method=sampler.sampling_method,
        num_sampling_steps=sampler.num_steps, nfe=nfe, cfg_scale=guidance.scale,
        guided_channels=(model_config["in_channels"] if guidance.all_channels or sources.guide else 3) if guided else None,
        guidance_interval=tuple(guidance.interval) if guided and tuple(guidance.interval) != (0.0, 1.0) else None,
        precision=config.precision, global_seed=config.seed,
        label_draw=label_draw(config, settings.num_classes),
        num_images=npz_shape_[0], image_shape=tuple(npz_shape_[1:]), sampler_settings=sampler_settings,
        versions=package_versions(), checkpoint_file=sources.checkpoint_file, vae_sha256=sources.vae_sha256,
        nfe_measured=measured, batch_size=config.batch_size, world_size=world_size, preset=preset,
        guide_checkpoint=sources.guide, guide_checkpoint_sha256=sources.guide_sha256,
        label_sampling=None if config.label_sampling == "random" else config.label_sampling)


def label_draw(config: SamplingConfig, num_classes: int) -> str:
    """How the images' labels were chosen (the record's label_draw), for --label-sampling random or balanced."""
    if config.label_sampling == "balanced":
        return (f"balanced: exactly {config.num_images // num_classes} images of each of {num_classes} classes; "
                f"image i's label is p[i] mod {num_classes}, p a permutation of 0..{config.num_images - 1} seeded by "
                f"(global seed, {config.num_images}), as sit.generation.balanced_labels")
    return (f"uniform over {num_classes} classes: torch.randint on a CPU generator seeded by "
            f"(global seed, image index), as sit.generation.noise_and_labels")


def describes_same_images(earlier: SampleRecord, record: SampleRecord) -> bool:
    """Whether two records agree on everything that shapes the images (not on what a rerun may change),
    their arrays' hashes included where the earlier one holds them."""
    mine, theirs = earlier.to_dict(), record.to_dict()
    return all(mine[key] == theirs.get(key) for key in mine if key not in NOT_SHAPING_IMAGES)


def finish_sample_batch(folder: str, num_images: int, make_record: Callable[[tuple[int, ...]], SampleRecord],
                        logger: Any, labels: Optional[np.ndarray] = None) -> str:
    """Build <folder>.npz (with the images' `labels` when given), then its record (make_record: the record of
    an .npz of that shape (N, H, W, 3), plus the arrays' hashes); returns the record's path. A run that
    sampled nothing keeps an earlier record of the same images, adding the hashes when it has none."""
    finish_npz(folder, num_images, logger, labels)
    npz_path = f"{folder}.npz"
    with reported_as(f"cannot read {npz_path} to hash its arrays"):
        hashes = npz_hashes(npz_path)
    record, path = dataclasses.replace(make_record(npz_shape(npz_path)), **hashes), record_path(npz_path)
    try:
        earlier = read_record(path) if os.path.isfile(path) else None
    except RecordError:
        earlier = None
    if earlier is not None and record.nfe_measured["batches"] == 0:
        unhashed = earlier.images_sha256 is None  # written before records held hashes: the .npz's added
        earlier = dataclasses.replace(earlier, **hashes) if unhashed else earlier
        if describes_same_images(earlier, record):
            if unhashed:
                with reported_as(f"cannot write the record {path}"):
                    write_record(npz_path, earlier)
            logger.info(f"Kept the record {path} (no image was sampled again)"
                        + (", adding the arrays' SHA-256" if unhashed else ""))
            return path
    with reported_as(f"cannot write the record {path}"):
        write_record(npz_path, record)
    logger.info(f"Saved the record of how the images were made to {path}")
    return path
