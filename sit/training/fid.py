"""FID while training (--fid-every): EMA samples generated as sample_ddp.py generates them, scored
against reference statistics with sit.metrics' definitions, never keeping more than one batch."""
from __future__ import annotations

from typing import Optional

import torch

from sit.config import GuidanceConfig
from sit.distributed import DistContext
from sit.errors import UsageError
from sit.generation import generate_blocks
from sit.latents import LatentSpace
from sit.metrics import FIDMonitor
from sit.sampling.families import training_sample_fn
from transport import Transport


def make_fid_monitor(ref_path: str, device: torch.device, weights_path: Optional[str]) -> FIDMonitor:
    """The FID accumulator of --fid-every (built on forked RNGs: the training streams stay untouched);
    UsageError if its statistics or weights are unusable."""
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return FIDMonitor(ref_path, device, weights_path=weights_path)
    except (ValueError, OSError) as error:  # InceptionWeightsError is a UsageError, hence a ValueError
        raise UsageError(f"cannot measure FID: {error}") from None


@torch.no_grad()
def measure_fid(ema: torch.nn.Module, vae: Optional[LatentSpace], transport: Transport, monitor: FIDMonitor,
                ctx: DistContext, *, num_images: int, batch_size: int, num_steps: int, cfg_scale: float,
                global_seed: int, precision: str) -> float:
    """FID of num_images EMA samples (every rank takes part and gets the value), decoded with the run's
    latent space (None: pixels); per-image seeds, so `sample_ddp.py ODE --sampling-method euler
    --num-sampling-steps <num_steps>` (MeanFlow: `sample_ddp.py MeanFlow`) draws the same images."""
    sample_fn = training_sample_fn(ema.config, transport, num_steps, num_steps)
    indices = range(ctx.rank, num_images, ctx.world_size)  # this rank's images, in batches of batch_size
    batches = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    blocks = generate_blocks(batches, ema, vae, sample_fn, global_seed=global_seed,
                             num_classes=ema.config["num_classes"], guidance=GuidanceConfig(scale=cfg_scale),
                             precision=precision, device=ctx.device)
    for block in blocks:
        monitor.update(block.images)  # (B, 3, H, W)
    fid = monitor.compute()
    monitor.reset()
    return fid
