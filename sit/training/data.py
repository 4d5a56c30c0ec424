"""The training data: an image folder (--data-path) or cached latents (--feature-path), and the
loader that deals it to ranks in an order a resumed run can continue exactly."""
from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
from torch.utils.data import DataLoader

from sit.data.features import LatentFeatureDataset, has_tokens, read_meta
from sit.data.images import TrainImageFolder
from sit.data.order import ResumableDistributedSampler
from sit.distributed import DistContext
from sit.errors import UsageError
from sit.training.settings import TrainConfig
from sit.training.signals import ignore_stop_signals

TrainDataset = Union[TrainImageFolder, LatentFeatureDataset]


def features_vae(feature_path: str) -> Optional[str]:
    """The VAE that made the features in feature_path (None: unknown, or no features there)."""
    meta = read_meta(feature_path)
    return meta.get("vae") if meta else None


def open_feature_dataset(config: TrainConfig, image_size_origin: str = "flag") -> LatentFeatureDataset:
    """The cached latents of --feature-path, checked against --image-size (image_size_origin: where that
    came from, see sit.config.Resolved). Raises UsageError."""
    data, encoder = config.data, config.token_encoder
    dataset = LatentFeatureDataset(data.feature_path, seed=data.global_seed, random_flip=data.random_flip,
                                   with_tokens=encoder is not None)
    meta = dataset.meta
    if meta["image_size"] != config.model.image_size and image_size_origin == "checkpoint":
        raise UsageError(f"the features in {data.feature_path} are of {meta['image_size']}px images, not the "
                         f"checkpoint's image_size {config.model.image_size}: use features extracted at that size")
    if meta["image_size"] != config.model.image_size:
        raise UsageError(f"the features in {data.feature_path} are of {meta['image_size']}px images, "
                         f"not --image-size {config.model.image_size}: pass --image-size {meta['image_size']}")
    if encoder is not None and meta.get("repa_encoder") != encoder:
        made_with = f"tokens of {meta['repa_encoder']}" if has_tokens(meta) else "no encoder tokens"
        raise UsageError(f"--repa-encoder {encoder} with --feature-path {data.feature_path}, which holds {made_with}: "
                         f"run extract_features.py --repa-encoder {encoder} into a new --features-path")
    dataset.classes = meta["classes"]  # as TrainImageFolder's, for the checks and the log
    return dataset


def open_training_data(config: TrainConfig, origins: Optional[Mapping[str, str]] = None) -> TrainDataset:
    """The dataset of --data-path or --feature-path, with no more class folders than --num-classes; origins
    (sit.config.Resolved's) let a message blame the flag, the default or the checkpoint."""
    data = config.data
    origins = origins or {}
    num_classes_origin = origins.get("num_classes", "flag")
    if data.feature_path is not None:
        dataset = open_feature_dataset(config, origins.get("image_size", "flag"))
    else:
        dataset = TrainImageFolder(data.data_path, config.model.image_size, seed=data.global_seed,
                                   random_flip=data.random_flip)
    count, limit = len(dataset.classes), config.model.num_classes
    if count > limit:
        flag = "--feature-path" if data.feature_path else "--data-path"
        if num_classes_origin == "checkpoint":
            raise UsageError(f"{flag} has {count} class folders but the checkpoint's num_classes is {limit}: its "
                             f"model has {limit} class labels; use data with at most {limit} class folders")
        default = " (the default)" if num_classes_origin == "default" else ""
        raise UsageError(f"{flag} has {count} class folders but --num-classes is {limit}{default}: "
                         f"pass --num-classes {count} or more")
    return dataset


def build_loader(config: TrainConfig, dataset: TrainDataset, ctx: DistContext,
                 seed: int) -> tuple[DataLoader, ResumableDistributedSampler]:
    """This rank's loader of local batches and its sampler (set_epoch(epoch, skip) starts mid-epoch)."""
    data = config.data
    # (epoch, index) items: flips follow the epoch even in persistent workers, which never see set_epoch
    sampler = ResumableDistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                          seed=data.global_seed, with_epoch=True)
    loader = DataLoader(
        dataset, batch_size=data.global_batch_size // ctx.world_size, shuffle=False, sampler=sampler,
        num_workers=data.num_workers, pin_memory=torch.cuda.is_available(), drop_last=True,
        worker_init_fn=ignore_stop_signals,
        persistent_workers=data.num_workers > 0,  # workers live across epochs (items carry their epoch)
        # The loader's own generator: starting an iterator must not draw from the training RNG,
        # or a resumed run (which starts one mid-epoch) would drift from an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler
