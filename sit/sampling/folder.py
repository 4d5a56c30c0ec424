"""sample_ddp.py's sample folder: its name (every setting that changes the images; older names kept), its PNGs
and the .npz built from them, each written through sit.files.atomic_write."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import zipfile
from typing import Any, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from sit.archives import npz_problem, read_npy_header
from sit.distributed import DistContext, on_main
from sit.errors import RunFailure, reported_as
from sit.files import atomic_write, check_free_space, remove_temporaries, removed_on_failure_if_empty
from sit.latents import LATENT_SPACES
from sit.locks import LOCK_FILE, acquire_folder_lock
from sit.record import LABELS_KEY  # <folder>.npz: the class label of each image of arr_0, in the same order
from sit.sampling.settings import ModelSettings, SamplingConfig

FOLDER_SETTINGS = "settings.json"  # what shaped the folder's images (sit.sampling.batch_record)


def short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def checkpoint_tag(ckpt: Optional[str]) -> str:
    """'pretrained', or the checkpoint's file stem plus a hash of where it is (two runs' 0400000.pt differ)."""
    if ckpt is None:
        return "pretrained"
    where = os.path.realpath(ckpt) if os.path.exists(ckpt) else ckpt
    stem = os.path.splitext(os.path.basename(ckpt.rstrip("/")))[0] or "ckpt"
    return f"{stem}-{short_hash(where)}"


def vae_tag(vae: Optional[str]) -> str:
    """'pixels', a table entry of sit.latents as it is, or a folder's name plus a hash of where it is."""
    if vae is None or vae in LATENT_SPACES:
        return vae or "pixels"
    return f"{os.path.basename(os.path.normpath(vae))}-{short_hash(os.path.realpath(vae))}"


def folder_name(config: SamplingConfig, settings: ModelSettings) -> str:
    """A folder name made of every setting that changes the images (or the likelihoods)."""
    sampler, guidance, transport = config.sampler, config.guidance, settings.transport
    parts = [settings.name.replace("/", "-"), checkpoint_tag(settings.ckpt), f"{settings.image_size}px",
             f"vae-{vae_tag(settings.vae)}", sampler.mode, sampler.sampling_method, f"steps-{sampler.num_steps}",
             f"cfg-{guidance.scale}", transport.path_type, transport.prediction, f"seed-{config.seed}",
             f"bs-{config.batch_size}"]
    parts += sampler.folder_parts()  # the sampler family's own settings
    if transport.sample_eps is not None:
        parts.append(f"eps-{transport.sample_eps}")
    if sampler.time_shift is not None:  # a shifted step grid (--time-shift)
        parts.append(f"shift-{sampler.time_shift}")
    if guidance.scale > 1.0 and guidance.all_channels and guidance.guide_ckpt is None:
        parts.append("allchannels")  # autoguidance guides every channel anyway
    if guidance.scale > 1.0 and tuple(guidance.interval) != (0.0, 1.0):
        parts.append(f"interval-{guidance.interval[0]}-{guidance.interval[1]}")
    if guidance.guide_ckpt is not None:
        parts.append(f"guide-{checkpoint_tag(guidance.guide_ckpt)}")
    if config.precision != "tf32":  # other precisions give other images; the default keeps older folder names
        parts.append(f"prec-{config.precision}")
    if config.label_sampling != "random":  # balanced labels depend on the image count: a rerun may not add more
        parts.append(f"labels-{config.label_sampling}-{config.num_images}")
    name = "-".join(str(part) for part in parts)
    likelihood = config.likelihood
    if likelihood is not None:
        source = f"data-{checkpoint_tag(likelihood.data_path)}" if likelihood.data_path else "generated"
        name += f"-likelihood-{source}"
        if settings.vae is None:  # pixel space: 8-bit images, dequantized
            name += f"-deq-{likelihood.dequantization}"
        if likelihood.exact_trace or likelihood.num_probes != 1:
            name += "-exact-trace" if likelihood.exact_trace else f"-probes-{likelihood.num_probes}"
    return name


def png_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"{index:06d}.png")


def npz_temporary_suffix(folder: str) -> str:
    """How the temporary name of <folder>.npz ends (atomic_write puts ".tmp-XXXXXXXX" before it): a
    hash of the folder's name, so a killed build's leftover is known to be this folder's."""
    return f"-{short_hash(os.path.basename(os.path.normpath(folder)))}.npz"


def remove_stale_temporary_files(folder: str) -> int:
    """Delete what a killed run left behind: temporary PNGs in folder, and temporary <folder>.npz
    files beside it (each may be gigabytes; other folders' are kept); returns how many."""
    # every hidden .tmp name: atomic_write's ".tmp-<pid>@<host>~XXXXXXXX.png.tmp" and older versions'
    # ".<name>.<pid>.tmp"; those of another live process are kept (remove_temporaries)
    parent = os.path.dirname(os.path.normpath(folder)) or "."
    return remove_temporaries(folder, ".tmp", prefix=".") + remove_temporaries(parent, npz_temporary_suffix(folder))


def create_sample_folder(folder: str, logger: Any) -> None:
    """Create folder and lock it for this run (sit.locks: UsageError while another live run writes it),
    clear a killed run's temporary files, and say so."""
    with reported_as(f"--sample-dir: cannot create the sample folder {folder}"):
        os.makedirs(folder, exist_ok=True)
        acquire_folder_lock(folder, "the sample folder", warn=logger.warning)
        removed = remove_stale_temporary_files(folder)
    logger.info(f"Saving to {folder}" + (f" (removed {removed} unfinished files)" if removed else ""))


def open_sample_folder(ctx: DistContext, sample_dir: str, config: SamplingConfig, settings: ModelSettings,
                       logger: Any) -> str:
    """<sample-dir>/<folder>, created by rank 0 (create_sample_folder); if that fails, every rank raises its message."""
    folder = os.path.join(sample_dir, folder_name(config, settings))
    on_main(ctx, functools.partial(create_sample_folder, folder, logger))
    return folder


def removed_if_left_empty(ctx: DistContext, folder: str,
                          sample_dir_existed: bool = True) -> contextlib.AbstractContextManager[None]:
    """A block that, if it fails, leaves no empty sample folder behind: rank 0 removes folder when it
    holds no image (only its lock and settings record), and --sample-dir too when this run created it."""
    created = [folder] + ([] if sample_dir_existed else [os.path.dirname(os.path.normpath(folder))])
    return removed_on_failure_if_empty(created, ignoring=(LOCK_FILE, FOLDER_SETTINGS), enabled=ctx.is_main)


def save_png(pixels: np.ndarray, path: str) -> None:
    """Write uint8 (H, W, 3) pixels as a PNG via a temporary name and a rename (no half-written PNG)."""
    atomic_write(path, functools.partial(Image.fromarray(pixels).save, format="PNG"), suffix=".png.tmp")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC; every whole PNG ends so
RGB_8_BIT = (8, 2)  # IHDR bit depth and colour type of the PNGs save_png writes


def png_is_complete(path: str, image_size: int) -> bool:
    """Whether path holds a whole 8-bit RGB PNG of image_size x image_size, judged without decoding it
    from its first 26 bytes (signature; IHDR: width, height, bit depth, colour type) and its last 12
    (the IEND chunk). A zero-byte, truncated, foreign or other-size file is not."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(26)
            if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
                return False
            handle.seek(-len(PNG_END), os.SEEK_END)
            tail = handle.read(len(PNG_END))
    except OSError:
        return False
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return (width, height) == (image_size, image_size) and tuple(head[24:26]) == RGB_8_BIT and tail == PNG_END


def missing_indices(folder: str, indices: range, image_size: Optional[int] = None) -> list[int]:
    """The indices whose PNG is not in folder yet; with image_size, also those whose PNG is not a whole
    image of that size (png_is_complete), which a rerun samples again."""
    if image_size is None:
        return [index for index in indices if not os.path.exists(png_path(folder, index))]
    return [index for index in indices if not png_is_complete(png_path(folder, index), image_size)]


def npz_shape(path: str) -> Optional[tuple]:
    """The shape of arr_0 in an .npz, read from its header only (None if unreadable)."""
    try:
        if npz_problem(path) is not None:  # a header that claims more than the file stores is no finished batch
            return None
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as stream:
            shape, _, dtype, _ = read_npy_header(stream)
            return tuple(shape) if dtype == np.uint8 else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def write_npz_stream(folder: str, num: int, image_shape: tuple, path: str) -> None:
    """Write the PNGs 0 .. num-1 of folder, each of image_shape (H, W, 3), as arr_0 of an npz at path."""
    shape = (num, *image_shape)  # (N, H, W, 3)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as stream:
            np.lib.format.write_array_header_1_0(stream, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for index in tqdm(range(num), desc="Building .npz file from samples"):
                try:
                    pixels = np.asarray(Image.open(png_path(folder, index)).convert("RGB"), dtype=np.uint8)
                except (OSError, ValueError) as error:
                    raise RunFailure(f"{png_path(folder, index)} cannot be read ({error}): delete it and run the "
                                     f"same command again to sample it anew") from None
                if pixels.shape != image_shape:
                    raise RunFailure(f"{png_path(folder, index)} is {pixels.shape}, not {image_shape}")
                stream.write(pixels.tobytes())


def png_shape(folder: str) -> tuple[int, int, int]:
    """(H, W, 3) of the folder's first PNG, read from its header."""
    with Image.open(png_path(folder, 0)) as image:
        return image.height, image.width, 3


def npz_bytes(num: int, image_shape: tuple[int, int, int]) -> int:
    """The size of an .npz of num uint8 images (N, H, W, 3): the pixels plus 4 KiB of zip and .npy headers."""
    return num * image_shape[0] * image_shape[1] * image_shape[2] + 4096


def check_space_for_samples(folder: str, num: int, image_size: int) -> None:
    """NoSpaceLeft before sampling when the missing PNGs and the .npz will not fit: the .npz exactly,
    a PNG at the mean size of those already written (at half the raw size while there are none)."""
    existing = [png_path(folder, index) for index in range(num) if os.path.exists(png_path(folder, index))]
    sizes = [os.path.getsize(path) for path in existing[:100]]
    per_png = sum(sizes) / len(sizes) if sizes else image_size * image_size * 3 / 2
    needed = int((num - len(existing)) * per_png) + npz_bytes(num, (image_size, image_size, 3))
    check_free_space(folder, needed, f"{num - len(existing):,} more PNGs and the .npz of {num:,} images")


def npz_has_labels(path: str) -> bool:
    """Whether an .npz holds a `labels` array (older sample batches do not)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return f"{LABELS_KEY}.npy" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def create_npz_from_sample_folder(folder: str, num: int, labels: Optional[np.ndarray] = None) -> str:
    """Write <folder>.npz, streamed image by image, atomically: arr_0 uint8 (num, H, W, 3) from 000000.png ...
    and, when given, the class labels (num,) int64 as `labels`; returns its path."""
    def write(path: str) -> None:
        write_npz_stream(folder, num, png_shape(folder), path)
        if labels is not None:
            with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                with archive.open(f"{LABELS_KEY}.npy", "w", force_zip64=True) as stream:
                    np.lib.format.write_array(stream, np.ascontiguousarray(labels, dtype=np.int64))

    atomic_write(f"{folder}.npz", write, suffix=npz_temporary_suffix(folder))
    return f"{folder}.npz"


def finish_npz(folder: str, num: int, logger: Any, labels: Optional[np.ndarray] = None) -> None:
    """Build <folder>.npz (with `labels`, when given) once all num PNGs exist (unless an identical one is there)."""
    missing = missing_indices(folder, range(num))
    if missing:
        raise RunFailure(f"{len(missing)} images are still missing in {folder} (first: {missing[0]}); "
                         f"run the same command again")
    existing = npz_shape(f"{folder}.npz")
    if existing is not None and existing[0] == num and (labels is None or npz_has_labels(f"{folder}.npz")):
        logger.info(f"{folder}.npz already holds {num} images {existing}")
        return
    check_free_space(f"{folder}.npz", npz_bytes(num, png_shape(folder)), f"{folder}.npz")
    with reported_as(f"cannot write {folder}.npz"):
        path = create_npz_from_sample_folder(folder, num, labels)
    with_labels = f" and their class labels as '{LABELS_KEY}'" if labels is not None else ""
    logger.info(f"Saved .npz file to {path} [shape={npz_shape(path)}]{with_labels}.")
