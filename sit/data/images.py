"""Image folders as training and evaluation read them: ADM's center crop, [-1, 1] tensors, and an
ImageFolder whose every item depends on (seed, epoch, index) only, so resumed runs see the same images."""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
from PIL import Image

from sit.data.order import flip_for
from sit.errors import UsageError


def center_crop_arr(pil_image, image_size: int):
    """ADM's center crop: halve with a box filter while large, resize bicubic so the short side is
    image_size, then crop the center square."""
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


def image_transform(image_size: int, random_flip: bool = True):
    """ADM center crop, optional random horizontal flip, to a (3, H, W) tensor in [-1, 1]."""
    from torchvision import transforms

    steps = [CenterCrop(image_size)]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True)]
    return transforms.Compose(steps)


class TrainImageFolder(torch.utils.data.Dataset):
    """An ImageFolder for training whose every item depends on (seed, epoch, index) only.

    Items are ((3, H, W) image in [-1, 1], label): ADM center crop, then a horizontal flip decided
    by `features.flip_for(seed, epoch, index)` rather than by worker RNG, so that an interrupted
    and resumed run sees exactly the images an uninterrupted one does, whatever the worker count.
    An image that cannot be read is skipped with a warning naming the file; the next readable
    image of the folder takes its place (the batch keeps its size).
    Raises UsageError when `root` is missing or holds no images.
    """

    def __init__(self, root: str, image_size: int, seed: int = 0, random_flip: bool = True):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        if not os.path.isdir(root):
            raise UsageError(f"--data-path {root} is not a folder")
        try:
            self.classes, class_to_idx = find_classes(root)
        except FileNotFoundError:
            raise UsageError(f"--data-path {root} holds no class folders (expected <root>/<class>/<image>)") from None
        self.samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not self.samples:
            raise UsageError(f"--data-path {root} holds no images (extensions: {', '.join(IMG_EXTENSIONS)})")
        self.transform = image_transform(image_size, random_flip=False)
        self.seed = seed
        self.random_flip = random_flip
        self.epoch = 0
        self.warned: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose flips to draw for plain-index items. DataLoader workers copy the
        dataset when an iterator starts, so call this before iterating; persistent workers need
        (epoch, index) items (ResumableDistributedSampler(with_epoch=True))."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        """item: an index (flipped per `set_epoch`'s epoch) or an (epoch, index) pair, which stays
        right with persistent DataLoader workers that never see set_epoch."""
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with open(path, "rb") as handle:
                    image = self.transform(Image.open(handle).convert("RGB"))  # (3, H, W)
                break
            except Exception as error:  # any decoding failure of one file must not end a long run
                if path not in self.warned:
                    self.warned.add(path)
                    print(f"warning: skipping unreadable image {path} ({type(error).__name__}: {error})",
                          file=sys.stderr, flush=True)
        else:
            raise RuntimeError("no image of the dataset could be read")
        if self.random_flip and flip_for(self.seed, epoch, index):
            image = image.flip(-1)
        return image, label
