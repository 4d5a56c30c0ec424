"""Turn an image folder into a reference batch for evaluate.py: ADM's center crop at --image-size.

    python make_reference.py /data/my_images ref.npz --image-size 256 [--max-images 10000]
    python evaluate.py ref.npz samples/<folder>.npz

The folder is read as train.py reads one; `arr_0` (N, H, W, 3) uint8 and `labels` (N,) int64 are held in
memory (10,000 images at 256 px: 1.8 GiB).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from sit.cli import ScriptParser, non_negative_int, positive_int, run_main
from sit.data.images import center_crop_arr, describe_failure, read_rgb
from sit.data.listing import IMAGE_EXTENSIONS, list_image_folder
from sit.errors import UsageError
from sit.metrics.npz import save_npz_atomic


def make_reference(folder: str, image_size: int, max_images: Optional[int] = None,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The center-cropped images (N, image_size, image_size, 3) uint8 of an image folder and their labels
    (N,) int64; UsageError when the folder holds no readable image."""
    if not os.path.isdir(folder):
        raise UsageError(f"{folder} is not a folder: name the image folder (<folder>/<class>/<image>)")
    try:
        listing = list_image_folder(folder)
    except FileNotFoundError:
        raise UsageError(f"{folder} holds no class folders (expected {folder}/<class>/<image>; "
                         f"one class folder will do)") from None
    if listing.warning():
        print(f"warning: {listing.warning()}", file=sys.stderr)
    if not listing.samples:
        raise UsageError(f"{folder} holds no images (expected {folder}/<class>/<image>, extensions: "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    samples = listing.samples
    if max_images is not None and max_images < len(samples):  # a seeded subset, kept in listing order
        keep = np.sort(np.random.default_rng(seed).choice(len(samples), size=max_images, replace=False))
        samples = [samples[index] for index in keep]
    images, labels = np.zeros((len(samples), image_size, image_size, 3), np.uint8), []  # (N, H, W, 3)
    for path, label in tqdm(samples, desc="center crop", unit="image"):
        try:
            images[len(labels)] = np.asarray(center_crop_arr(read_rgb(path), image_size))
        except Exception as error:  # any decoding failure skips the file, as training does
            print(f"warning: skipping unreadable image {describe_failure(path, error)}", file=sys.stderr)
            continue
        labels.append(label)
    if not labels:
        raise UsageError(f"{folder}: none of its {len(samples)} images can be read; check the files")
    return images[:len(labels)], np.asarray(labels, dtype=np.int64)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Write the reference .npz of the folder on the command line."""
    parser = ScriptParser(description="Write an image folder's ADM center crops as a reference .npz for "
                                      "evaluate.py.", allow_abbrev=False)
    parser.add_argument("folder", help="image folder: <folder>/<class>/<image> (one class folder will do)")
    parser.add_argument("output", help="the reference .npz to write (arr_0 and labels)")
    parser.add_argument("--image-size", type=positive_int, required=True,
                        help="side of ADM's center crop in pixels: the samples' size (e.g. 256)")
    parser.add_argument("--max-images", type=positive_int, default=None,
                        help="keep a seeded random subset of this many images (default: all)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the --max-images subset")
    args = parser.parse_args(argv)
    if not args.output.endswith(".npz"):
        raise UsageError(f"output {args.output}: name a .npz file (evaluate.py reads arr_0 from it)")
    images, labels = make_reference(args.folder, args.image_size, args.max_images, args.seed)
    save_npz_atomic(args.output, arr_0=images, labels=labels)
    print(f"Wrote {len(images)} images of {args.image_size}x{args.image_size} to {args.output}; "
          f"`python evaluate.py {args.output} SAMPLES.npz` compares samples with it")


if __name__ == "__main__":
    sys.exit(run_main(main, "make_reference.py"))
