"""Export scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes) as an ImageFolder.

    python export_digits.py data/digits

writes data/digits/class00/0000.png ... class09/1796.png: 8x8 grey RGB PNGs, levels 0..16 scaled to 0..255,
on which the README's CPU quick start trains a pixel-space SiT in minutes.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from sit.cli import ScriptParser, run_main
from sit.errors import UsageError
from sit.files import atomic_write, folder_problem, remove_temporaries

DIGIT_LEVELS = 16  # sklearn's digits hold integers 0..16


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The digits as uint8 grey images (N, 8, 8) in 0..255 and their labels (N,) in 0..9."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / DIGIT_LEVELS)).astype(np.uint8)  # (N, 8, 8)
    return images, digits.target.astype(np.int64)


def export_digits(root: str) -> int:
    """Write every digit atomically as root/classNN/IIII.png (RGB); returns the number of images written."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise UsageError(f"{root!r} exists and is not a folder")
    problem = folder_problem(root)
    if problem:
        raise UsageError(f"output {root}: {problem}; name a folder you can write (it is created if missing)")
    images, labels = digits_uint8()
    folders = [os.path.join(root, f"class{label:02d}") for label in range(10)]  # sorted order = label order
    try:
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            remove_temporaries(folder, ".tmp")
    except OSError as error:
        raise UsageError(f"output {root}: cannot create its class folders ({error.strerror or error}); "
                         f"name a folder you can write") from None
    for index, (grey, label) in enumerate(zip(images, labels)):
        rgb = np.repeat(grey[:, :, None], 3, axis=2)  # (8, 8) -> (8, 8, 3)
        path = os.path.join(folders[label], f"{index:04d}.png")
        atomic_write(path, functools.partial(Image.fromarray(rgb).save, format="PNG"), suffix=".tmp")
    return len(images)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Export the digits to the folder on the command line (UsageError when it is a file)."""
    parser = ScriptParser(description="Export scikit-learn's 8x8 digits as an ImageFolder of PNGs.",
                                     allow_abbrev=False)
    parser.add_argument("output", type=str, help="folder to write class00 ... class09 into")
    args = parser.parse_args(argv)
    count = export_digits(args.output)
    print(f"Wrote {count} digit images in 10 class folders to {args.output}")


if __name__ == "__main__":
    sys.exit(run_main(main, "export_digits.py"))
