"""Every rank's random number generator state, saved in checkpoints and restored on resume, so that
a resumed run draws exactly the noise an uninterrupted one would."""
from __future__ import annotations

import logging

import torch

from sit.distributed import DistContext, gather_objects


def gather_rng_states(device: torch.device) -> list[dict]:
    """Every rank's torch RNG states, {"cpu": ByteTensor, "cuda": ByteTensor or None}, on the CPU in rank order
    (a collective: all ranks must call it)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    states = gather_objects({"cpu": torch.get_rng_state(), "cuda": cuda})
    return [{key: None if value is None else value.cpu() for key, value in state.items()} for state in states]


def restore_rng(stored: list[dict], ctx: DistContext, seed: int, train_steps: int, logger: logging.Logger) -> None:
    """This rank's RNG state from a checkpoint's `rng` (exact continuation needs the same process
    count); otherwise a warning and a fresh seed for this step."""
    if len(stored) == ctx.world_size:
        state = stored[ctx.rank]  # gather_rng_states' dict
        torch.set_rng_state(state["cpu"].cpu())
        if ctx.device.type == "cuda" and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"].cpu(), ctx.device)
        return
    logger.warning(f"warning: the checkpoint was written by {len(stored)} processes, this run has {ctx.world_size}: "
                   f"random streams restart, so losses will not match an uninterrupted run")
    torch.manual_seed(seed + train_steps)
