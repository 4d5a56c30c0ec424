"""Generating images from a SiT: per-index seeds (image i's noise and label from (global seed, i), a block's
SDE noise from its first index), balanced labels, the guided model call, and the index blocks that
sample_ddp.py and FID-during-training share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from sit.config import GuidanceConfig
from sit.errors import RunFailure
from sit.latents import as_latent_space, latent_shape
from sit.speed import autocast

SEED_STREAMS = {"image": 0, "sde": 1, "likelihood": 2, "dequantize": 3, "labels": 4}
LABEL_SAMPLINGS = ("random", "balanced")  # sample_ddp.py --label-sampling; random: the original's


def seed_for(global_seed: int, index: int, stream: str) -> int:
    """A 63-bit seed for one image index (or block start) and one use (a key of SEED_STREAMS): distinct
    (seed, index, stream) triples give unrelated generators."""
    state = np.random.SeedSequence([global_seed, index, SEED_STREAMS[stream]]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) >> 1)


def noise_and_labels(indices: Sequence[int], global_seed: int, shape: tuple[int, int, int], num_classes: int,
                     planned: Optional[np.ndarray] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's noise, then label, from a CPU generator seeded by (global_seed, index): z (N, C, L, L) and
    y (N,) int64 on the CPU. planned: every image's label (e.g. balanced_labels), taken instead of a draw."""
    noises, labels = [], []
    for index in indices:
        generator = torch.Generator().manual_seed(seed_for(global_seed, index, "image"))
        noises.append(torch.randn(shape, generator=generator))
        labels.append(torch.randint(0, num_classes, (), generator=generator) if planned is None
                      else torch.tensor(int(planned[index]), dtype=torch.int64))
    return torch.stack(noises), torch.stack(labels)


def balanced_labels(num_images: int, global_seed: int, num_classes: int) -> np.ndarray:
    """Labels (num_images,) int64, num_images / num_classes of every class: image i's is p[i] mod num_classes,
    p a permutation seeded by (global_seed, num_images). ValueError unless num_classes divides num_images."""
    if num_classes < 1 or num_images % num_classes:
        raise ValueError(f"balanced labels need a number of images that is a multiple of the {num_classes} "
                         f"classes, got {num_images}")
    seed = np.random.SeedSequence([global_seed, num_images, SEED_STREAMS["labels"]])
    order = np.random.Generator(np.random.PCG64(seed)).permutation(num_images)  # (num_images,) int64
    return (order % num_classes).astype(np.int64)


def planned_labels(label_sampling: str, num_images: int, global_seed: int, num_classes: int) -> Optional[np.ndarray]:
    """The labels of images 0..num_images-1 fixed ahead (balanced_labels), or None for random."""
    if label_sampling == "random":
        return None
    if label_sampling == "balanced":
        return balanced_labels(num_images, global_seed, num_classes)
    raise ValueError(f"label_sampling must be one of {', '.join(LABEL_SAMPLINGS)}, got {label_sampling!r}")


def image_labels(num_images: int, global_seed: int, shape: tuple[int, int, int], num_classes: int,
                 chunk: int = 1024) -> np.ndarray:
    """The labels (num_images,) int64 noise_and_labels draws for images 0..num_images-1, in chunks."""
    parts = [noise_and_labels(range(start, min(start + chunk, num_images)), global_seed, shape, num_classes)[1]
             for start in range(0, num_images, chunk)]
    return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.int64)


class ObservedSampleFunction:
    """A sampler function fn(x, model_fn, **kwargs) whose model evaluations also call on_evaluation(t), t the
    first sample's time (0-dim, on the device; not read here); `nfe` is the wrapped function's."""

    def __init__(self, sample_fn: Callable, on_evaluation: Callable[[torch.Tensor], None]):
        self.sample_fn, self.on_evaluation = sample_fn, on_evaluation

    nfe = property(lambda self: self.sample_fn.nfe)

    def __call__(self, x: torch.Tensor, model_fn: Callable, **kwargs: Any) -> Any:
        def evaluate(x_t: torch.Tensor, t: torch.Tensor, **model_kwargs: Any) -> Any:
            output = model_fn(x_t, t, **model_kwargs)
            self.on_evaluation(t.reshape(-1)[0])  # (N,) -> ()
            return output

        return self.sample_fn(x, evaluate, **kwargs)


def guided_sample(sample_fn: Callable, model: Any, z: torch.Tensor, y: torch.Tensor,
                  guidance: GuidanceConfig = GuidanceConfig(), always_guide: bool = False) -> torch.Tensor:
    """The samples (N, C, L, L) from noise z: (N, C, L, L) with labels y: (N,). With guidance.scale > 1, or
    always_guide (the original sample.py's rule), z is doubled with null labels for forward_with_cfg; an
    autoguided model (sit.guidance) guides itself."""
    if (guidance.scale > 1.0 or always_guide) and not getattr(model, "guides_itself", False):
        null_labels = torch.full_like(y, model.num_classes)
        z_in = torch.cat([z, z], dim=0)            # (2N, C, L, L)
        y_in = torch.cat([y, null_labels], dim=0)  # (2N,)
        samples = sample_fn(z_in, model.forward_with_cfg, y=y_in, cfg_scale=guidance.scale,
                            guide_all_channels=guidance.all_channels, cfg_interval=tuple(guidance.interval))[-1]
        samples, _ = samples.chunk(2, dim=0)       # drop the null-class half
        return samples
    return sample_fn(z, model.forward, y=y)[-1]


class NonFiniteWatch:
    """A model seen by a sampler: its forward and forward_with_cfg record, on the device, the first
    evaluation whose output holds NaN or Inf and the t it was called at (everything else is the model's)."""

    def __init__(self, model: Any):
        self.model, self.calls = model, 0
        self.first_bad: Any = None  # (evaluation number, t) as device tensors once called; number 0: none yet

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def watched(self, function: Callable) -> Callable:
        def call(x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            output = function(x, t, *args, **kwargs)
            self.calls += 1
            zero = torch.zeros((), device=output.device)
            number, at = self.first_bad if self.first_bad is not None else (zero.long(), zero)
            new = ~torch.isfinite(output).all() & (number == 0)
            self.first_bad = (torch.where(new, self.calls, number), torch.where(new, t.reshape(-1)[0].float(), at))
            return output
        return call

    forward = property(lambda self: self.watched(self.model.forward))
    forward_with_cfg = property(lambda self: self.watched(self.model.forward_with_cfg))

    def failure(self, latents: Optional[torch.Tensor]) -> Optional[RunFailure]:
        """The RunFailure to raise when a model output or the final latents (N, C, L, L) were not finite, else
        None; one synchronisation when all is finite."""
        finite = torch.isfinite(latents).all() if latents is not None else torch.ones((), dtype=torch.bool)
        if self.first_bad is not None:
            finite = finite & (self.first_bad[0] == 0)
        if bool(finite):
            return None
        if self.first_bad is not None and int(self.first_bad[0]) > 0:
            return RunFailure(f"the sampler produced non-finite values at step {int(self.first_bad[0])} of "
                              f"{self.calls} (model evaluation at t = {float(self.first_bad[1]):.4f})")
        return RunFailure(f"the sampler produced non-finite values after its last step ({self.calls} model "
                          f"evaluations, all finite)")


def generate_latents(sample_fn: Callable, model: Any, z: torch.Tensor, y: torch.Tensor, guidance: GuidanceConfig,
                     precision: str = "fp32", always_guide: bool = False,
                     stop_on_non_finite: bool = False) -> torch.Tensor:
    """guided_sample under the --precision autocast (only the model's matmuls; the state stays fp32).

    stop_on_non_finite: RunFailure naming the step and t where the samples stopped being finite (NonFiniteWatch)."""
    with autocast(precision, z.device):
        if not stop_on_non_finite:
            return guided_sample(sample_fn, model, z, y, guidance, always_guide)
        watch = NonFiniteWatch(model)
        try:
            latents = guided_sample(sample_fn, watch, z, y, guidance, always_guide)
        except (AssertionError, RuntimeError) as error:  # e.g. an adaptive solver's "underflow in dt nan"
            failure = watch.failure(None)
            if failure is not None:
                raise failure from error
            raise
        failure = watch.failure(latents)
        if failure is not None:
            raise failure
        return latents


def index_blocks(num_images: int, block_size: int) -> list[range]:
    """Indices 0..num_images-1 cut into consecutive blocks of block_size (the last may be shorter)."""
    return [range(start, min(start + block_size, num_images)) for start in range(0, num_images, block_size)]


def blocks_of_rank(blocks: list[range], rank: int, world_size: int) -> list[range]:
    """Blocks dealt to ranks in turn: block k goes to rank k % world_size."""
    return blocks[rank::world_size]


@dataclass
class GeneratedBlock:
    """One block of generated images: their indices, images (n, 3, H, W) float in about [-1, 1], labels (n,)."""
    indices: range
    images: torch.Tensor
    labels: torch.Tensor


@torch.no_grad()
def generate_blocks(blocks: Iterable[range], model: Any, vae: Any, sample_fn: Callable, *, global_seed: int,
                    num_classes: int, guidance: GuidanceConfig, precision: str,
                    device: torch.device, stop_on_non_finite: bool = False,
                    labels: Optional[np.ndarray] = None) -> Iterator[GeneratedBlock]:
    """Sample and decode each block of indices as one batch (vae: as_latent_space's argument, None: pixels)
    from noise_and_labels (labels: planned ones, or None), the SDE noise seeded by the block's first index.
    stop_on_non_finite: RunFailure naming the block, the step and t where the samples stopped being finite."""
    shape, space = latent_shape(model.config), as_latent_space(vae)
    forked = [device] if device.type == "cuda" else []
    for block in blocks:
        z, y = noise_and_labels(block, global_seed, shape, num_classes, labels)
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(seed_for(global_seed, block.start, "sde"))
            try:
                latents = generate_latents(sample_fn, model, z.to(device), y.to(device), guidance, precision,
                                           stop_on_non_finite=stop_on_non_finite)
            except RunFailure as failure:
                raise RunFailure(f"images {block.start}..{block.stop - 1}: {failure}; the weights or sampler "
                                 f"settings diverge (try more steps, another sampler or an earlier checkpoint)"
                                 ) from None
        yield GeneratedBlock(block, space.decode(latents.float(), precision), y)
