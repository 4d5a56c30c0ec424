"""Autoguidance (Karras et al. 2024, edm2): D = D_guide + w (D_main - D_guide), w = --cfg-scale, a model
guided by a weaker version of itself; every channel guided, only t in --cfg-interval (docs/sampling.md)."""
from __future__ import annotations

import torch


class AutoGuidedModel(torch.nn.Module):
    """A main model guided by `guide` with scale w over the interval of t, called as model(x, t, y) on one
    batch of N; `config` and `num_classes` are the main model's."""

    guides_itself = True  # sit.generation.guided_sample calls it on the batch as it is (no null-label half)

    def __init__(self, main: torch.nn.Module, guide: torch.nn.Module, scale: float,
                 interval: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        self.main = main
        self.guide = guide
        self.scale = float(scale)
        self.interval = (float(interval[0]), float(interval[1]))

    @property
    def config(self) -> dict:
        return self.main.config

    @property
    def num_classes(self) -> int:
        return self.main.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W), t: (N,) in [0, 1], y: (N,) labels; returns the guided output (N, C, H, W)."""
        main_output = self.main(x, t, y)
        if self.scale == 1.0:
            return main_output  # w = 1 is the main model exactly
        low, high = self.interval
        everywhere = low <= 0.0 and high >= 1.0
        inside = None if everywhere else (t >= low) & (t <= high)  # (N,)
        # with an interval: one synchronisation per call, which decides whether the guide runs at all
        num_inside = len(t) if inside is None else int(inside.sum())
        if num_inside == 0:
            return main_output
        guide_output = self.guide(x, t, y)
        guided = guide_output + self.scale * (main_output - guide_output)
        if num_inside == len(t):
            return guided
        return torch.where(inside.view(-1, *([1] * (guided.ndim - 1))), guided, main_output)  # (N, 1, 1, 1) mask
