"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"; edm2's
generate_images.py): guide a model with a weaker version of itself (smaller, or trained for less)
instead of its own unconditional branch.

    D(x, t, y) = D_guide(x, t, y) + w (D_main(x, t, y) - D_guide(x, t, y)),   w = --cfg-scale

Both models see the same inputs and labels (the guide is conditional too). As edm2, every output
channel is guided (the original's first-3-channels rule belongs to its classifier-free guidance), so
--guide-all-channels changes nothing here. With --cfg-interval LO HI only samples whose t lies in
[LO, HI] are guided; elsewhere the output is the main model's alone (the guide is not evaluated).
The sampler functions are unchanged: `AutoGuidedModel` is the model they call, one batch of N.
"""
from __future__ import annotations

import torch


class AutoGuidedModel(torch.nn.Module):
    """A main model guided by `guide` with scale w over the interval of t; called as model(x, t, y).

    `config` and `num_classes` are the main model's, so the generation code treats it as that model.
    """

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
