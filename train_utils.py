"""What the scripts share: argument groups, transport/sampler construction, distributed setup,
rank-0 logging, VAE loading and atomic file writes.

The three `parse_*_args` functions keep the original's names, flags and defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from features import flip_for
from transport import (DIFFUSION_FORMS, LAST_STEPS, LOSS_WEIGHTS, ODE_METHODS, PATH_TYPES, PREDICTIONS,
                       SDE_METHODS, Sampler, Transport, create_transport)

LATENT_SCALE = 0.18215  # SD-VAE latents are scaled by this to unit variance
VAE_REPOS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


#################################################################################
#                                Argument groups                                #
#################################################################################

def none_or_str(value: str) -> Optional[str]:
    """argparse type: the string 'None' means None."""
    return None if value == "None" else value


def positive_int(value: str) -> int:
    """argparse type: an integer > 0."""
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def positive_float(value: str) -> float:
    """argparse type: a float > 0."""
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def non_negative_float(value: str) -> float:
    """argparse type: a float >= 0."""
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def parse_transport_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Transport arguments")
    group.add_argument("--path-type", type=str, default="Linear", choices=list(PATH_TYPES))
    group.add_argument("--prediction", type=str, default="velocity", choices=list(PREDICTIONS))
    group.add_argument("--loss-weight", type=none_or_str, default=None, choices=list(LOSS_WEIGHTS))
    group.add_argument("--sample-eps", type=float, default=None,
                       help="distance from the interval's ends when sampling (default: by path and prediction)")
    group.add_argument("--train-eps", type=float, default=None,
                       help="distance from the interval's ends when training (default: by path and prediction)")


def parse_ode_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ODE arguments")
    group.add_argument("--sampling-method", type=str, default="dopri5", choices=list(ODE_METHODS),
                       help="ODE solver (torchdiffeq); adaptive ones choose their own number of model calls")
    group.add_argument("--atol", type=positive_float, default=1e-6, help="Absolute tolerance")
    group.add_argument("--rtol", type=positive_float, default=1e-3, help="Relative tolerance")
    group.add_argument("--reverse", action="store_true")
    group.add_argument("--likelihood", action="store_true")


def parse_sde_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SDE arguments")
    group.add_argument("--sampling-method", type=str, default="Euler", choices=list(SDE_METHODS))
    group.add_argument("--diffusion-form", type=str, default="sigma", choices=list(DIFFUSION_FORMS),
                       help="form of diffusion coefficient in the SDE")
    group.add_argument("--diffusion-norm", type=non_negative_float, default=1.0,
                       help="magnitude of the diffusion coefficient (>= 0)")
    group.add_argument("--last-step", type=none_or_str, default="Mean", choices=list(LAST_STEPS),
                       help="form of last step taken in the SDE")
    group.add_argument("--last-step-size", type=positive_float, default=0.04, help="size of the last step taken")


def transport_from_args(args: argparse.Namespace) -> Transport:
    """The Transport that the transport argument group describes."""
    return create_transport(args.path_type, args.prediction, args.loss_weight, args.train_eps, args.sample_eps)


def ode_fn_from_args(sampler: Sampler, args: argparse.Namespace, keep_trajectory: bool = False) -> Callable:
    """The ODE sampling function that the ODE argument group describes."""
    return sampler.sample_ode(sampling_method=args.sampling_method, num_steps=args.num_sampling_steps,
                              atol=args.atol, rtol=args.rtol, reverse=args.reverse, keep_trajectory=keep_trajectory)


def sde_fn_from_args(sampler: Sampler, args: argparse.Namespace, keep_trajectory: bool = False) -> Callable:
    """The SDE sampling function that the SDE argument group describes."""
    return sampler.sample_sde(sampling_method=args.sampling_method, diffusion_form=args.diffusion_form,
                              diffusion_norm=args.diffusion_norm, last_step=args.last_step,
                              last_step_size=args.last_step_size, num_steps=args.num_sampling_steps,
                              keep_trajectory=keep_trajectory)


# The scripts' mode argument -> its sampling function; drives the argparse choices and the dispatch.
SAMPLING_MODES = {"ODE": ode_fn_from_args, "SDE": sde_fn_from_args}


def sample_fn_from_args(sampler: Sampler, mode: str, args: argparse.Namespace, keep_trajectory: bool = False) -> Callable:
    """The ODE or SDE sampling function that the ODE/SDE argument groups describe."""
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; choose one of {', '.join(SAMPLING_MODES)}")
    return SAMPLING_MODES[mode](sampler, args, keep_trajectory)


#################################################################################
#                               Distributed setup                               #
#################################################################################

@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) job."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(timeout_minutes: int = 30) -> DistContext:
    """Join the torchrun job (NCCL on GPUs, Gloo on CPU), or run as a single plain process.

    The device comes from LOCAL_RANK, so multi-node jobs pick the right GPU.
    """
    use_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return DistContext(rank=0, world_size=1, local_rank=0, device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Synchronise all processes (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all processes, in place (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """Whether every rank reports ok (a collective in a distributed job)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def create_logger(logging_dir: Optional[str], is_main: bool = True, name: str = "sit") -> logging.Logger:
    """A logger writing to stdout and `<logging_dir>/log.txt` on rank 0, silent elsewhere."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    if not is_main:
        logger.addHandler(logging.NullHandler())
        return logger
    logger.setLevel(logging.INFO)
    formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if logging_dir is not None:
        handlers.append(logging.FileHandler(os.path.join(logging_dir, "log.txt")))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


#################################################################################
#                               VAE and file I/O                                #
#################################################################################

def load_vae(name: str, device: torch.device) -> Any:
    """The SD VAE: "ema" or "mse" (from the Hugging Face hub) or a local diffusers folder.

    Raises SystemExit with a one-line message saying what to pass instead when it cannot load.
    """
    from diffusers.models import AutoencoderKL

    source = VAE_REPOS.get(name, name)
    if name not in VAE_REPOS and not os.path.isdir(name):
        raise SystemExit(f"error: --vae {name!r} is neither one of {', '.join(VAE_REPOS)} nor a local diffusers folder")
    try:
        vae = AutoencoderKL.from_pretrained(source)
    except Exception as error:  # network, hub or file errors: all end the same way for the user
        raise SystemExit(f"error: could not load the VAE {source!r} ({type(error).__name__}: {str(error)[:200]}); "
                         f"download it once with network access, or pass --vae /path/to/a/local/diffusers/AutoencoderKL/folder")
    return vae.to(device).eval().requires_grad_(False)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only swap it)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)  # elsewhere: swap and restore at once
    os.umask(umask)
    return umask


def fsync_path(path: str) -> None:
    """Flush a file's (or a folder's) data to disk; folders are best effort (not every system can open them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it to `path`: a crash
    never leaves a partial file at `path` (the temporary name starts with ".tmp-" and ends with `suffix`).
    The file gets the permissions the umask gives a new file (mkstemp's own are 0600)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp_path)
        fsync_path(tmp_path)
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    fsync_path(directory)  # the rename itself


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file beside `path`, then rename."""
    atomic_write(path, functools.partial(torch.save, obj), suffix=".pt")


#################################################################################
#                                    Images                                     #
#################################################################################

def center_crop_arr(pil_image, image_size: int):
    """ADM's center crop: halve with a box filter while large, resize bicubic so the short side is
    image_size, then crop the center square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)  # (H, W, 3)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


class CenterCrop:
    """Transform wrapper of center_crop_arr (a class, so DataLoader workers can pickle it)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, pil_image):
        return center_crop_arr(pil_image.convert("RGB"), self.image_size)


def image_transform(image_size: int, random_flip: bool = True):
    """ADM center crop, optional random horizontal flip, to a (3, H, W) tensor in [-1, 1]."""
    from torchvision import transforms

    steps = [CenterCrop(image_size)]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True)]
    return transforms.Compose(steps)


#################################################################################
#                              Precision and speed                              #
#################################################################################

# --precision choice -> autocast dtype (None: no autocast). tf32 is fp32 storage with TF32 matmuls.
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def configure_precision(precision: str) -> None:
    """Set the global matmul precision flags for a --precision choice (TF32 only on GPUs)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    allow_tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32


def autocast(precision: str, device: torch.device):
    """The autocast context for a --precision choice: bf16/fp16 mixed precision, or a no-op.

    Parameters stay fp32; only the forward's matmuls and convolutions run in the lower precision.
    """
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float = 0.9999) -> None:
    """ema = decay * ema + (1 - decay) * model, for every parameter, with fused multi-tensor ops.

    As the original, the frozen pos_embed takes part too (it is equal in both, so it stays put).
    """
    model_params = dict(model.named_parameters())
    ema_params = dict(ema_model.named_parameters())
    names = list(model_params)
    targets = [ema_params[name] for name in names]
    torch._foreach_mul_(targets, decay)  # the original's arithmetic: ema * decay + param * (1 - decay)
    torch._foreach_add_(targets, [model_params[name].detach() for name in names], alpha=1 - decay)


def add_speed_arguments(parser: argparse.ArgumentParser, precision_default: Optional[str] = "tf32") -> None:
    """--precision and --compile, shared by train.py, sample.py and sample_ddp.py.

    precision_default None lets a script tell an explicit --precision apart (sample_ddp's --no-tf32).
    """
    group = parser.add_argument_group("Speed arguments")
    group.add_argument("--precision", type=str, choices=list(PRECISIONS), default=precision_default,
                       help="fp32; tf32 (the original's default: fp32 weights, TF32 matmuls on GPUs); bf16 or fp16 "
                            "autocast of the model (and VAE) forward, weights, EMA and optimizer state stay fp32")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile each transformer block (the first steps are slow while compiling)")


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile every SiT block in place (static shapes) and return the model.

    Blocks rather than the whole model: DDP still overlaps gradient all-reduce with the backward
    of earlier blocks, gradient checkpointing recomputes a compiled block, forward_with_cfg
    (which calls self.forward) runs compiled too, and all blocks share one graph. The time t
    reaches the blocks only as the tensor c, so sampler steps at new times never recompile.
    Compile after any deepcopy (e.g. the EMA): a copy would keep calling the original's blocks.
    """
    for block in model.blocks:
        block.compile(dynamic=False)
    return model


def compile_for_sampling(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile the whole forward for inference and return the model.

    The weights are frozen into the graph (Inductor's freezing: constant folding and, on CPU,
    prepacked oneDNN matmuls) and, on CPU, kernels are autotuned: about 1.3x per sampler step on a
    2-core CPU (benchmarks/bench.py), at ~1 min of compilation. Only for weights that no longer
    change (the sampling scripts); training uses compile_model.
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    on_cpu = all(not param.is_cuda for param in model.parameters())
    model.forward = torch.compile(model.forward, dynamic=False, mode="max-autotune-no-cudagraphs" if on_cpu else None)
    return model


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that scales the loss for fp16 and is a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def make_optimizer(model: torch.nn.Module, lr: float = 1e-4, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The paper's AdamW (constant lr 1e-4, no weight decay), fused on GPUs, multi-tensor elsewhere.

    All parameters are handed over, the frozen pos_embed included (AdamW skips it), so that the
    state's parameter indices match the original's checkpoints.
    """
    params = list(model.parameters())
    on_gpu = all(param.is_cuda for param in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=on_gpu, foreach=not on_gpu)


#################################################################################
#                    Training data, resumable order, RNG state                  #
#################################################################################

class TrainImageFolder(torch.utils.data.Dataset):
    """An ImageFolder for training whose every item depends on (seed, epoch, index) only.

    Items are ((3, H, W) image in [-1, 1], label): ADM center crop, then a horizontal flip decided
    by `features.flip_for(seed, epoch, index)` rather than by worker RNG, so that an interrupted
    and resumed run sees exactly the images an uninterrupted one does, whatever the worker count.
    An image that cannot be read is skipped with a warning naming the file; the next readable
    image of the folder takes its place (the batch keeps its size).
    Raises ValueError when `root` is missing or holds no images.
    """

    def __init__(self, root: str, image_size: int, seed: int = 0, random_flip: bool = True):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        if not os.path.isdir(root):
            raise ValueError(f"--data-path {root} is not a folder")
        try:
            self.classes, class_to_idx = find_classes(root)
        except FileNotFoundError:
            raise ValueError(f"--data-path {root} holds no class folders (expected <root>/<class>/<image>)") from None
        self.samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not self.samples:
            raise ValueError(f"--data-path {root} holds no images (extensions: {', '.join(IMG_EXTENSIONS)})")
        self.transform = image_transform(image_size, random_flip=False)
        self.seed = seed
        self.random_flip = random_flip
        self.epoch = 0
        self.warned: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose flips to draw for plain-index items. DataLoader workers copy the
        dataset when an iterator starts, so call this before iterating; persistent workers need
        (epoch, index) items (ResumableDistributedSampler(with_epoch=True))."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        """item: an index (flipped per `set_epoch`'s epoch) or an (epoch, index) pair, which stays
        right with persistent DataLoader workers that never see set_epoch."""
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with open(path, "rb") as handle:
                    image = self.transform(Image.open(handle).convert("RGB"))  # (3, H, W)
                break
            except Exception as error:  # any decoding failure of one file must not end a long run
                if path not in self.warned:
                    self.warned.add(path)
                    print(f"warning: skipping unreadable image {path} ({type(error).__name__}: {error})",
                          file=sys.stderr, flush=True)
        else:
            raise RuntimeError("no image of the dataset could be read")
        if self.random_flip and flip_for(self.seed, epoch, index):
            image = image.flip(-1)
        return image, label


class ResumableDistributedSampler(torch.utils.data.distributed.DistributedSampler):
    """DistributedSampler that can start an epoch part-way: `set_epoch(epoch, skip)` drops the
    first `skip` indices of this rank's share of the epoch (without loading them).

    with_epoch=True yields (epoch, index) pairs, so that datasets drawing per-epoch flips stay
    right in persistent DataLoader workers (which keep their own copy of the dataset).
    """

    def __init__(self, *args: Any, with_epoch: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skip = 0
        self.with_epoch = with_epoch

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        if self.with_epoch:
            return iter([(self.epoch, index) for index in indices])
        return iter(indices)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


def rng_state(device: torch.device) -> dict:
    """This process's torch RNG states: {"cpu": ByteTensor, "cuda": ByteTensor or None}."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def gather_rng_states(device: torch.device) -> list[dict]:
    """Every rank's rng_state, in rank order (a collective: all ranks must call it)."""
    state = rng_state(device)
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return [{key: None if value is None else value.cpu() for key, value in item.items()} for item in states]


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Set this process's torch RNG states from rng_state's dict."""
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
