"""Listing an image folder (<root>/<class>/.../<image>) as every script reads one: torchvision ImageFolder's
classes, order and extensions, but only regular files, each real file once; what is skipped (SKIP_REASONS:
FIFOs, link loops, second links, links into another class) is counted in one warning line."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

# torchvision's IMG_EXTENSIONS, compared case-insensitively as its has_file_allowed_extension does
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# why an entry was skipped -> how the warning counts it
SKIP_REASONS = {
    "not_regular": "not a regular file (FIFO, socket, device or dangling link)",
    "duplicate": "the same real file listed again",
    "loop": "folder link to a folder holding it, the root or above (a loop)",
    "again": "folder link to a folder already listed by another path",
    "other_class": "folder link into another class's folder",
}


@dataclass
class ImageListing:
    """An image folder's classes (sorted names), its (path, label) samples and what was skipped."""
    root: str
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: dict[str, int] = field(default_factory=dict)  # reason (SKIP_REASONS) -> count
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> the first such path

    def skip(self, reason: str, path: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_skipped.setdefault(reason, path)

    def warning(self, flag: str = "--data-path") -> Optional[str]:
        """One line counting what was skipped, with the first path of each kind (None: nothing skipped)."""
        if not self.skipped:
            return None
        parts = [f"{count} {SKIP_REASONS[reason]}, e.g. {self.first_skipped[reason]}"
                 for reason, count in self.skipped.items()]
        return (f"{flag} {self.root}: skipped {sum(self.skipped.values())} entries, each real image file is read "
                f"once: {'; '.join(parts)}")


def is_within(path: str, folder: str) -> bool:
    """Whether the (real) path is folder or inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class FolderWalk:
    """The walk of one listing: the real folders and files seen so far, shared by all classes."""

    def __init__(self, listing: ImageListing, root_real: str, class_reals: dict[str, str]):
        self.listing = listing
        self.root_real = root_real
        self.class_reals = class_reals  # class name -> its folder's real path
        self.seen_folders: set[str] = set()
        self.seen_files: set[str] = set()

    def folder_problem(self, real: str, class_name: str, folder_real: str) -> Optional[str]:
        """Why a folder link to `real` in `folder_real` must not be walked (a SKIP_REASONS key), or None."""
        if is_within(folder_real, real) or is_within(self.root_real, real):
            return "loop"
        if real in self.seen_folders:
            return "again"
        for other, other_real in self.class_reals.items():
            if other != class_name and is_within(real, other_real) and not is_within(real, self.class_reals[class_name]):
                return "other_class"
        return None

    def class_images(self, class_name: str, label: int) -> list[tuple[str, int]]:
        """The class folder's images as (path, label), in torchvision's order; of two paths to one real
        file, the first in that order is kept."""
        top = os.path.join(self.listing.root, class_name)
        top_real = self.class_reals[class_name]
        if is_within(self.root_real, top_real):
            self.listing.skip("loop", top)  # a class folder that links to the root or above
            return []
        found: list[tuple[str, list[tuple[str, str]]]] = []  # (folder as listed, its (image path, real path))
        pending = [(top, top_real)]  # a stack: sub-folders pushed in reverse name order pop in name order
        while pending:
            folder, real = pending.pop()
            if real in self.seen_folders:  # another link to it (or another class's) came first: listed once
                self.listing.skip("again", folder)
                continue
            self.seen_folders.add(real)
            images: list[tuple[str, str]] = []
            subfolders: list[tuple[str, str]] = []
            try:
                entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
            except OSError:
                continue  # unreadable folder: os.walk (torchvision's) skips it silently as well
            for entry in entries:
                self.visit(entry, real, class_name, images, subfolders)
            pending.extend(reversed(subfolders))
            found.append((folder, images))
        found.sort(key=lambda item: item[0])  # torchvision sorts os.walk's (folder, ...) tuples
        samples = []
        for path, real in (image for _, images in found for image in images):
            if real in self.seen_files:
                self.listing.skip("duplicate", path)
                continue
            self.seen_files.add(real)
            samples.append((path, label))
        return samples

    def visit(self, entry: os.DirEntry, folder_real: str, class_name: str, images: list[tuple[str, str]],
              subfolders: list[tuple[str, str]]) -> None:
        """Sort one folder entry: a folder to walk, an image to list, or something skipped."""
        linked = entry.is_symlink()
        if entry.is_dir():  # follows links, as os.walk(followlinks=True)
            real = os.path.realpath(entry.path) if linked else os.path.join(folder_real, entry.name)
            problem = self.folder_problem(real, class_name, folder_real) if linked else None
            if problem:
                self.listing.skip(problem, entry.path)
            else:
                subfolders.append((entry.path, real))
            return
        if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
            return
        if not entry.is_file():  # d_type for plain entries (no system call), the target's type for links
            self.listing.skip("not_regular", entry.path)
            return
        images.append((entry.path, os.path.realpath(entry.path) if linked else os.path.join(folder_real, entry.name)))


def list_image_folder(root: str) -> ImageListing:
    """The classes and images of root (see the module docstring). Raises FileNotFoundError when root
    has no class folder (as torchvision's find_classes); the samples may be empty."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folder in {root}")
    listing = ImageListing(root, classes, [])
    class_reals = {name: os.path.realpath(os.path.join(root, name)) for name in classes}
    walk = FolderWalk(listing, os.path.realpath(root), class_reals)
    for label, name in enumerate(classes):
        listing.samples += walk.class_images(name, label)
    return listing
