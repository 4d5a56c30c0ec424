"""Image folders as training and evaluation read them: the one image reader (`read_rgb`: every mode to
RGB, docs/reliability.md), ADM's center crop to [-1, 1] tensors, and an ImageFolder whose every item
depends on (seed, epoch, index) only, so resumed runs see the same images."""
from __future__ import annotations

import os
import stat
import sys
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from sit.data.listing import IMAGE_EXTENSIONS, list_image_folder
from sit.data.order import flip_for
from sit.errors import RunFailure, UsageError

SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
WITH_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")
SIXTEEN_BIT_MAX = 65535


class ImageRefused(ValueError):
    """An image file the reader will not use; the message names the file and the reason."""


def scale_16_bit(values: np.ndarray) -> np.ndarray:
    """16-bit values (any integer dtype, 0..65535) -> uint8 round(v / 257), exactly (v / 257 is never x.5)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def composite_over_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8: round((c a + 255 (255 - a)) / 255) per channel."""
    colour, alpha = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
    return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def to_rgb(image: Image.Image, path: str) -> Image.Image:
    """An RGB image of a loaded image of any mode: 16-bit grey scaled, transparency composited over white,
    the rest Pillow's conversion; ImageRefused naming path (mode F, I outside 0..65535, no conversion)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_GREY or mode == "I":
        values = np.asarray(image)  # (H, W), uint16 (either byte order) or int32
        if mode == "I" and values.size and (values.min() < 0 or values.max() > SIXTEEN_BIT_MAX):
            raise ImageRefused(f"{path}: 32-bit integer pixels outside 0..{SIXTEEN_BIT_MAX} (mode I), whose scale "
                               f"is unknown: save it as an 8-bit or 16-bit image")
        return Image.fromarray(scale_16_bit(values), "L").convert("RGB")
    if mode == "F":
        raise ImageRefused(f"{path}: 32-bit float pixels (mode F), whose range is unknown: save it as an 8-bit "
                           f"or 16-bit image")
    if mode in WITH_ALPHA or (mode == "P" and "transparency" in image.info):
        return Image.fromarray(composite_over_white(np.asarray(image.convert("RGBA"))), "RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageRefused(f"{path}: Pillow cannot convert mode {mode} to RGB ({error})") from None


def read_rgb(path: str) -> Image.Image:
    """The image at path as a loaded RGB PIL image; ImageRefused (not a regular file, a decompression bomb,
    a mode to_rgb refuses) or whatever decoding raised."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block on open
        raise ImageRefused(f"{path} is not a regular file")
    with open(path, "rb") as handle:
        with warnings.catch_warnings():  # the size is judged below, with the file named
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(handle)
            except Image.DecompressionBombError as error:  # over twice the limit: Pillow refuses it itself
                raise ImageRefused(f"{path}: {error} Raise PIL.Image.MAX_IMAGE_PIXELS if the image is genuine") from None
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and image.width * image.height > limit:
            raise ImageRefused(f"{path}: {image.width}x{image.height} pixels, more than Pillow's limit of {limit} "
                               f"(a decompression bomb?); raise PIL.Image.MAX_IMAGE_PIXELS if the image is genuine")
        image.load()
        return to_rgb(image, path)


def describe_failure(path: str, error: BaseException) -> str:
    """Why an image cannot be used, one line starting with its path: the refusal, or the decoder's error."""
    if isinstance(error, ImageRefused):
        return " ".join(str(error).split())
    if isinstance(error, Image.UnidentifiedImageError):
        return f"{path} (not an image file Pillow can identify: empty, damaged or another kind of file)"
    return f"{path} ({type(error).__name__}: {' '.join(str(error).split())})"


def center_crop_arr(pil_image, image_size: int):
    """ADM's center crop of a PIL image to image_size x image_size."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)  # (H, W, 3)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


class CenterCrop:
    """Transform wrapper of center_crop_arr (a class, so DataLoader workers can pickle it)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, pil_image):
        return center_crop_arr(pil_image.convert("RGB"), self.image_size)


def image_transform(image_size: int):
    """ADM center crop to a (3, H, W) tensor in [-1, 1] (unflipped: TrainImageFolder flips by flip_for)."""
    from torchvision import transforms

    return transforms.Compose([CenterCrop(image_size), transforms.ToTensor(),
                               transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True)])


class TrainImageFolder(torch.utils.data.Dataset):
    """Items ((3, H, W) image in [-1, 1], label) with ADM's crop and a flip by flip_for(seed, epoch, index),
    whatever the workers. An unreadable image is warned about and the next readable one takes its place.
    `transform` replaces the crop to [-1, 1]. UsageError when `root` has no (readable) images."""

    def __init__(self, root: str, image_size: int, seed: int = 0, random_flip: bool = True,
                 transform: Optional[Callable] = None):
        if not os.path.isdir(root):
            raise UsageError(f"--data-path {root} is not a folder")
        try:
            listing = list_image_folder(root)
        except FileNotFoundError:
            raise UsageError(f"--data-path {root} holds no class folders (expected <root>/<class>/<image>)") from None
        except OSError as error:
            raise UsageError(f"--data-path {root} cannot be listed ({error.strerror or error})") from None
        self.root, self.classes, self.samples = root, listing.classes, listing.samples
        self.listing_warning = listing.warning()
        if not self.samples:
            raise UsageError(f"--data-path {root} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        self.transform = transform or image_transform(image_size)
        self.seed = seed
        self.random_flip = random_flip
        self.epoch = 0
        self.warned: set[str] = set()
        self.last_failure: Optional[str] = None
        self.first_readable()

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain-index items' flips; call before iterating (persistent workers: pairs)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int, warn: bool = True) -> Optional[torch.Tensor]:
        """The transformed image at index (unflipped), or None, warned once per file (why: `last_failure`)."""
        path = self.samples[index][0]
        try:
            return self.transform(read_rgb(path))  # (3, H, W)
        except Exception as error:  # any decoding failure of one file must not end a long run
            self.last_failure = describe_failure(path, error)
            if warn and path not in self.warned:
                self.warned.add(path)
                print(f"warning: skipping unreadable image {self.last_failure}", file=sys.stderr, flush=True)
            return None

    def first_readable(self) -> int:
        """The index of the first readable image (earlier ones warned about); UsageError when none is."""
        first_failure = None
        for index in range(len(self.samples)):
            if self.read(index, warn=False) is not None:
                for earlier in range(index):
                    self.read(earlier)  # now with the warning
                return index
            first_failure = first_failure or self.last_failure
        raise UsageError(f"--data-path {self.root}: none of its {len(self.samples)} images can be read, e.g. "
                         f"{first_failure}; check the files")

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        """item: an index (flipped per set_epoch's epoch) or an (epoch, index) pair (persistent workers)."""
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        for offset in range(len(self.samples)):
            position = (index + offset) % len(self.samples)
            image = self.read(position)
            if image is not None:
                break
        else:
            raise RunFailure(f"no image of --data-path can be read any more (e.g. {self.samples[index][0]}); "
                             f"were the files removed while the run was reading them?")
        label = self.samples[position][1]
        if self.random_flip and flip_for(self.seed, epoch, index):
            image = image.flip(-1)
        return image, label
