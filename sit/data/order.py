"""The data order of training, made to resume exactly: per-(seed, epoch, image) flips and a
distributed sampler that can start an epoch part-way."""
from __future__ import annotations

import hashlib
from typing import Any

import torch


def flip_for(seed: int, epoch: int, index: int) -> bool:
    """A reproducible coin flip per (seed, epoch, image): independent of workers and resumes."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=1).digest()
    return bool(digest[0] & 1)


class ResumableDistributedSampler(torch.utils.data.distributed.DistributedSampler):
    """DistributedSampler whose `set_epoch(epoch, skip)` drops the first `skip` indices of this rank's share;
    with_epoch yields (epoch, index) pairs (right in persistent DataLoader workers)."""

    def __init__(self, *args: Any, with_epoch: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skip = 0
        self.with_epoch = with_epoch

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        return iter([(self.epoch, index) for index in indices] if self.with_epoch else indices)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)
