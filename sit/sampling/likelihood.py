"""sample_ddp.py --likelihood of real images (--data-path) or fresh samples, latent or pixel space (a
`Measure`), to <folder>/likelihood.csv; resumable, each fixed block seeded by (global seed, its first index)
and saved to likelihood-block-<start>.json (docs/evaluation.md)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import numpy as np
import torch
from tqdm import tqdm

from sit.config import ODEConfig, TransportConfig, build_sample_fn
from sit.data.images import CenterCrop, TrainImageFolder, image_transform
from sit.dequantize import dequantize, image_bits_per_dim
from sit.distributed import DistContext, gather_objects, reduce_numbers
from sit.errors import UsageError
from sit.files import atomic_text
from sit.generation import blocks_of_rank, generate_latents, index_blocks, noise_and_labels, seed_for
from sit.latents import LatentSpace, PixelSpace, latent_shape, uint8_hwc
from sit.sampling.loading import SamplingModel
from sit.sampling.settings import LikelihoodConfig, SamplingConfig
from transport import Sampler

Scores = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # per image (n,): log-density, NLL (nats), bits/dim


@dataclass(frozen=True)
class Measure:
    """What the likelihood is measured on. Data are what a block holds (observe_real: from the dataset's
    (n, 3, H, W) images; observe_generated: from the sampler's output); `scores` runs the likelihood."""
    device: torch.device
    header: ClassVar[tuple[str, ...]]  # the CSV columns


@dataclass(frozen=True)
class LatentMeasure(Measure):
    """A latent model: the likelihood of VAE latents (real images: their posterior mean), per latent dimension."""
    space: LatentSpace  # loaded
    header = ("index", "label", "logp_nats", "nll_nats", "bits_per_dim")

    def observe_real(self, images: torch.Tensor) -> torch.Tensor:
        """images (n, 3, H, W) in [-1, 1] -> latents (n, C, H/d, W/d): the mean makes the result deterministic."""
        return self.space.encode(images.to(self.device), sample=False)

    def observe_generated(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def scores(self, latents: torch.Tensor, labels: torch.Tensor, model_fn: Callable, likelihood_fn: Callable,
               generator: torch.Generator) -> Scores:
        result = likelihood_fn(latents, model_fn, y=labels)
        return result.logp, -result.logp, result.bits_per_dim

    def summary(self, num: int, source: str, nll: float, bpd: float, config: LikelihoodConfig) -> str:
        return f"{num} {source}: mean NLL {nll:.4f} nats per image, {bpd:.6f} bits per latent dimension"


@dataclass(frozen=True)
class PixelMeasure(Measure):
    """A pixel-space model: bits/dim of 8-bit images (uint8 (n, 3, H, W)), dequantized with `dequantization`."""
    dequantization: str
    header = ("index", "label", "logp_x_nats", "nll_image_nats", "bits_per_dim")

    def observe_real(self, images: torch.Tensor) -> torch.Tensor:
        return images  # dequantized on the CPU, from the block's own generator

    def observe_generated(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples (n, 3, H, W) quantized as the PNGs would be: uint8 (n, 3, H, W)."""
        pixels = uint8_hwc(PixelSpace().decode(samples)).cpu()                     # (n, H, W, 3)
        return pixels.permute(0, 3, 1, 2)                                          # (n, 3, H, W)

    def scores(self, images: torch.Tensor, labels: torch.Tensor, model_fn: Callable, likelihood_fn: Callable,
               generator: torch.Generator) -> Scores:
        """float64 (n,) each: log p(x) on the model's [-1, 1] scale, the negative bound on log P(image), bits/dim."""
        x, log_q = dequantize(images, self.dequantization, generator)  # (n, 3, H, W) float64, (n,)
        result = likelihood_fn(x.to(self.device, torch.float32), model_fn, y=labels)
        logp_x = result.logp.double().cpu()
        num_dims = x[0].numel()
        bits_per_dim = image_bits_per_dim(logp_x, log_q.cpu(), num_dims)
        return logp_x, bits_per_dim * num_dims * math.log(2), bits_per_dim

    def summary(self, num: int, source: str, nll: float, bpd: float, config: LikelihoodConfig) -> str:
        divergence = "exact trace" if config.exact_trace else f"{config.num_probes} Hutchinson probe(s)"
        return f"{num} 8-bit {source} ({self.dequantization} dequantization, {divergence}): mean {bpd:.4f} bits/dim"


def dataset_transform(image_size: int, pixel_space: bool) -> Callable:
    """How --data-path images are read: uint8 (3, H, W) for pixel-space models, else (3, H, W) in
    [-1, 1]; the ADM center crop, no flip."""
    if not pixel_space:
        return image_transform(image_size)
    from torchvision import transforms

    return transforms.Compose([CenterCrop(image_size), transforms.PILToTensor()])


def measure_for(loaded: SamplingModel, config: LikelihoodConfig, device: torch.device) -> Measure:
    """The measure of the loaded model: pixels without a VAE, else latents (which refuse --dequantize)."""
    if loaded.vae is None:
        return PixelMeasure(device, config.dequantization)
    if config.dequantize is not None:
        raise UsageError("--dequantize applies to pixel-space models (trained with --vae none); this one works on "
                         "VAE latents, whose likelihood is reported per latent dimension: drop --dequantize")
    return LatentMeasure(device, loaded.vae)


def build_likelihood_fn(transport: TransportConfig, sampler: ODEConfig, config: LikelihoodConfig) -> Callable:
    """fn(x, model, **kwargs) -> LikelihoodResult of the ODE flags; UsageError when the settings do not fit."""
    try:
        return sampler.likelihood_fn(Sampler(transport.build()), config.num_probes, config.exact_trace)
    except ValueError as error:
        raise UsageError(str(error)) from None


def open_dataset(data_path: Optional[str], transform: Callable, num_classes: int) -> Optional[TrainImageFolder]:
    """The --data-path images (None without --data-path), listed and read as train.py reads them
    (sit.data.images): unreadable images are skipped with a warning, links and FIFOs as its listing says."""
    if data_path is None:
        return None
    dataset = TrainImageFolder(data_path, 0, random_flip=False, transform=transform)  # the size is transform's
    if len(dataset.classes) > num_classes:
        raise UsageError(f"--data-path has {len(dataset.classes)} class folders but the model has {num_classes} "
                         f"classes (the checkpoint's num_classes): use a folder with at most {num_classes} classes")
    return dataset


BLOCK_FILE = "likelihood-block-{start:06d}.json"  # a finished block's rows, in the run's folder


def block_path(folder: str, block: range) -> str:
    return os.path.join(folder, BLOCK_FILE.format(start=block.start))


def save_block(folder: str, block: range, header: tuple, rows: list) -> None:
    """A finished block's rows (index, label, logp, nll, bits/dim), atomically; JSON keeps every float exactly.
    The temporary's name ends in .tmp, so a killed run's leftover is removed by the next (sit.sampling.folder)."""
    text = json.dumps({"block": [block.start, block.stop], "header": list(header), "rows": rows}) + "\n"
    atomic_text(block_path(folder, block), text, suffix=".json.tmp")


def load_block(folder: str, block: range, header: tuple) -> Optional[list]:
    """The rows a previous run saved for exactly this block (same indices, same columns), or None when
    there is no such file or it is not one (unreadable, another block size or measure): evaluated again."""
    try:
        with open(block_path(folder, block)) as handle:
            saved = json.load(handle)
        rows = [tuple(row) for row in saved["rows"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    same = saved.get("block") == [block.start, block.stop] and saved.get("header") == list(header)
    return rows if same and all(len(row) == len(header) and isinstance(row[0], int) and row[0] in block
                                for row in rows) else None


def real_block(dataset: TrainImageFolder, block: range, measure: Measure) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The indices, data and labels (n,) of the dataset's readable images at the block's indices (an
    unreadable one is left out, with a warning naming it)."""
    read = [(index, dataset.read(index)) for index in block]
    kept = [(index, image) for index, image in read if image is not None]
    if not kept:
        return [], torch.empty(0), torch.empty(0, dtype=torch.long)
    images = torch.stack([image for _, image in kept])  # (n, 3, H, W)
    labels = torch.tensor([dataset.samples[index][1] for index, _ in kept], device=measure.device)
    return [index for index, _ in kept], measure.observe_real(images), labels


def generated_block(block: range, config: SamplingConfig, loaded: SamplingModel, sample_fn: Callable,
                    measure: Measure) -> tuple[torch.Tensor, torch.Tensor]:
    """The data and labels (n,) of fresh samples at the block's indices (per-index noise and labels)."""
    z, y = noise_and_labels(block, config.seed, latent_shape(loaded.model.config), loaded.settings.num_classes)
    labels = y.to(measure.device)
    latents = generate_latents(sample_fn, loaded.model, z.to(measure.device), labels, config.guidance, config.precision)
    return measure.observe_generated(latents), labels


def evaluate_likelihood(ctx: DistContext, config: SamplingConfig, loaded: SamplingModel, folder: str,
                        logger: Any) -> None:
    """Log-likelihood of the --data-path images or of fresh samples (every rank takes part): per-image
    rows to <folder>/likelihood.csv, the means to the log."""
    options, settings, model = config.likelihood, loaded.settings, loaded.model
    measure = measure_for(loaded, options, ctx.device)
    transform = dataset_transform(settings.image_size, pixel_space=loaded.vae is None)
    dataset = open_dataset(options.data_path, transform, settings.num_classes)
    if dataset is not None and dataset.listing_warning:
        logger.warning(f"warning: {dataset.listing_warning}")
    num_images = config.num_images if dataset is None else min(config.num_images, len(dataset))
    sample_fn = None if dataset is not None else build_sample_fn(settings.transport, config.sampler)
    likelihood_fn = build_likelihood_fn(settings.transport, config.sampler, options)
    blocks = blocks_of_rank(index_blocks(num_images, config.batch_size), ctx.rank, ctx.world_size)
    rows, pending = [], []
    for block in blocks:  # what an interrupted run of the same command finished is kept
        saved = load_block(folder, block, measure.header)
        if saved is None:
            pending.append(block)
        else:
            rows += saved
    (num_pending,) = reduce_numbers([sum(len(block) for block in pending)], ctx.device)
    if num_pending < num_images:
        logger.info(f"{num_images - int(num_pending)} of {num_images} images already evaluated "
                    f"(likelihood-block-*.json); evaluating the other {int(num_pending)}")
    progress = tqdm(total=int(num_pending), unit="img", disable=not ctx.is_main, dynamic_ncols=True)
    for block in pending:
        indices = list(block)
        if dataset is not None:
            indices, data, labels = real_block(dataset, block, measure)
        else:
            data, labels = generated_block(block, config, loaded, sample_fn, measure)
        block_rows = []
        if indices:
            generator = torch.Generator().manual_seed(seed_for(config.seed, block.start, "dequantize"))
            torch.manual_seed(seed_for(config.seed, block.start, "likelihood"))  # Hutchinson probes
            logp, nll, bpd = measure.scores(data, labels, model.forward, likelihood_fn, generator)
            columns = (indices, labels.tolist(), logp.tolist(), nll.tolist(), bpd.tolist())
            block_rows = [list(row) for row in zip(*columns)]
        save_block(folder, block, measure.header, block_rows)  # a block whose images are all unreadable too
        rows += [tuple(row) for row in block_rows]
        progress.update(min(len(block) * ctx.world_size, progress.total - progress.n))  # estimate: ranks run alike
    progress.close()
    all_rows = [row for part in gather_objects(rows) for row in part]  # every rank's, in rank order
    if ctx.is_main:
        table = io.StringIO()
        csv.writer(table).writerows([measure.header, *sorted(all_rows)])
        atomic_text(os.path.join(folder, "likelihood.csv"), table.getvalue(), suffix=".csv.tmp")
        source = f"images of {options.data_path}" if dataset is not None else "generated samples"
        nll, bpd = (float(np.mean([row[column] for row in all_rows])) for column in (3, 4))
        logger.info(f"Likelihood of {measure.summary(len(all_rows), source, nll, bpd, options)}; "
                    f"per-image values in {folder}/likelihood.csv")
