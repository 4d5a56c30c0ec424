"""Image grids: where each image goes (`GridLayout`), the grid PNG, and its labels laid out like the grid
(sample.py's `<grid>.labels.txt`, training's `preview_labels.txt`)."""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sit.files import atomic_text, atomic_write

EMPTY_CELL = "."  # a cell of the labels file with no image


@dataclass(frozen=True)
class GridLayout:
    """rows x columns cells; image i sits at (i // columns, i % columns), or with `column_major` at
    (i % rows, i // rows): labels that cycle through K values then give one row per value."""
    rows: int
    columns: int
    column_major: bool = False

    @classmethod
    def with_columns(cls, num_images: int, columns: int) -> "GridLayout":
        """Row by row, `columns` wide (torchvision's make_grid with nrow=columns)."""
        columns = max(1, min(columns, num_images))
        return cls(math.ceil(num_images / columns), columns)

    @classmethod
    def one_row_per_label(cls, num_images: int, num_labels: int) -> "GridLayout":
        """For images whose labels cycle through num_labels values (image i has label i % num_labels):
        row r holds every image of the r-th label."""
        rows = max(1, min(num_labels, num_images))
        return cls(rows, math.ceil(num_images / rows), column_major=True)

    def cells(self, num_images: int) -> list[Optional[int]]:
        """The image index of each cell, row by row (None: an empty cell)."""
        order = (column * self.rows + row if self.column_major else row * self.columns + column
                 for row in range(self.rows) for column in range(self.columns))
        return [index if index < num_images else None for index in order]


def label_rows(labels: Sequence[int], layout: GridLayout) -> list[str]:
    """The labels as the grid shows them: one string per row, space-separated ('.' for an empty cell)."""
    cells = [EMPTY_CELL if index is None else str(int(labels[index])) for index in layout.cells(len(labels))]
    return [" ".join(cells[row * layout.columns:(row + 1) * layout.columns]) for row in range(layout.rows)]


def labels_path(grid_path: str) -> str:
    """Where sample.py puts a grid's labels: out/grid.png -> out/grid.labels.txt."""
    return os.path.splitext(grid_path)[0] + ".labels.txt"


def arrange(images: torch.Tensor, layout: GridLayout) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] in the layout's cell order (M, 3, H, W), empty cells black."""
    if not layout.column_major:
        return images
    blank = torch.full_like(images[0], -1.0)
    return torch.stack([blank if index is None else images[index] for index in layout.cells(len(images))])


def save_grid(images: torch.Tensor, layout: GridLayout, path: str, fmt: Optional[str] = None) -> None:
    """Save images (N, 3, H, W) in [-1, 1] as one grid PNG (or the extension's format, or fmt), atomically."""
    from torchvision.utils import save_image

    write = functools.partial(save_image, arrange(images, layout), nrow=layout.columns, normalize=True,
                              value_range=(-1, 1), **({"format": fmt} if fmt else {}))
    atomic_write(path, write, suffix=os.path.splitext(path)[1])


def save_labels(labels: Sequence[int], layout: GridLayout, path: str) -> str:
    """Write a grid's labels (label_rows, one line each) to path (e.g. labels_path(grid)), atomically; returns path."""
    atomic_text(path, "".join(row + "\n" for row in label_rows(labels, layout)))
    return path
