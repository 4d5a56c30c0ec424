"""Per-channel latent statistics (--latent-norm per-channel, docs/latent_statistics.md), measured by
extract_features.py: mean_c = E[mu_c], std_c = sqrt(Var[mu_c] + E[sigma_c^2]) over the cached posteriors."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from sit.errors import UsageError
from sit.latents.space import Normalisation

CONSTANT, PER_CHANNEL = "constant", "per-channel"  # --latent-norm: the space's own constant, or measured statistics
LATENT_NORMS = (CONSTANT, PER_CHANNEL)
SD_VAES = ("ema", "mse")  # one encoder, two decoders: the same latents


@dataclass(frozen=True)
class LatentStatistics:
    """Per-channel mean and std of a dataset's latents, and how many values per channel they summarise."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    count: int

    def normalisation(self) -> Normalisation:
        """latents = (raw - mean_c) / std_c; raw = latents * std_c + mean_c."""
        return Normalisation(scale=tuple(1.0 / value for value in self.std), shift=self.mean)

    def to_dict(self) -> dict:
        """The stored form (meta.json's and a checkpoint's "latent_statistics"): plain lists and an int."""
        return {"mean": list(self.mean), "std": list(self.std), "count": self.count}

    @classmethod
    def from_dict(cls, stored: Any, where: str, advice: str, channels: Optional[int] = None) -> "LatentStatistics":
        """Statistics as stored; UsageError naming `where` and the advice when missing or unusable."""
        if stored is None:
            raise UsageError(f"{where} holds no latent statistics; {advice}")
        problem = statistics_problem(stored, channels)
        if problem is not None:
            raise UsageError(f"the latent statistics of {where} are unusable: {problem}; {advice}")
        mean, std = (tuple(float(value) for value in stored[key]) for key in ("mean", "std"))
        return cls(mean, std, int(stored["count"]))


def statistics_problem(stored: Any, channels: Optional[int] = None) -> Optional[str]:
    """What is wrong with stored statistics ({"mean": [C], "std": [C], "count": n}), or None."""
    if not isinstance(stored, dict) or not all(isinstance(stored.get(key), list) for key in ("mean", "std")):
        return "they are not {'mean': [...], 'std': [...], 'count': n}"
    mean, std = stored["mean"], stored["std"]
    if not (len(mean) == len(std) >= 1) or (channels is not None and len(mean) != channels):
        return f"{len(mean)} means and {len(std)} stds for {channels or 'the'} channels"
    for name, values in (("mean", mean), ("std", std)):
        for channel, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"channel {channel}'s {name} is {value!r}, not a finite number"
    if min(std) <= 0:
        return f"channel {std.index(min(std))}'s std is {min(std)}, not positive"
    count = stored.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return f"its count is {count!r}, not a positive integer"
    return None


class ChannelMoments:
    """Float64 running sums per channel of mu, mu^2 and sigma^2, and the values counted per channel."""

    def __init__(self, channels: int) -> None:
        self.sums = np.zeros((3, channels), dtype=np.float64)
        self.count = 0

    def add(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Posterior means and stds (..., C, h, w), e.g. a block of a feature folder (n, 2, C, h, w)."""
        channels = self.sums.shape[1]
        mu = np.moveaxis(np.asarray(mean), -3, 0).reshape(channels, -1).astype(np.float64)       # (C, values)
        sigma = np.moveaxis(np.asarray(std), -3, 0).reshape(channels, -1).astype(np.float64)     # (C, values)
        self.sums += np.stack([mu.sum(axis=1), np.square(mu).sum(axis=1), np.square(sigma).sum(axis=1)])
        self.count += mu.shape[1]

    def flat(self) -> list[float]:
        """The sums and the count as one list (to be summed over ranks: sit.distributed.reduce_numbers)."""
        return [*self.sums.ravel().tolist(), float(self.count)]

    @classmethod
    def from_flat(cls, values: list[float], channels: int) -> "ChannelMoments":
        moments = cls(channels)
        moments.sums = np.asarray(values[:-1], dtype=np.float64).reshape(3, channels)
        moments.count = int(values[-1])
        return moments

    def statistics(self) -> LatentStatistics:
        """The mean and std of the latents drawn from these posteriors (see the module docstring)."""
        total_mu, total_square, total_variance = self.sums / self.count
        variance = np.maximum(total_square - np.square(total_mu), 0.0) + total_variance
        return LatentStatistics(tuple(total_mu.tolist()), tuple(np.sqrt(variance).tolist()), self.count)


def same_latents(given: str, held: str) -> bool:
    """Whether statistics measured in latent space `held` (recorded) hold for --vae `given` (canonical): the
    same name, the two SD-VAEs, or a recorded folder that is not here with `given` a folder (moved)."""
    if given == held or (given in SD_VAES and held in SD_VAES):
        return True
    return os.path.isabs(held) and not os.path.isdir(held) and os.path.isdir(given)
