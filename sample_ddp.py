"""Sample many images from a SiT with one or more processes, for FID and other metrics; or evaluate
log-likelihoods (--likelihood).

    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py ODE --model SiT-XL/2 --num-fid-samples 50000
    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py ODE --likelihood --data-path /path/to/imagenet/val

Images go to <sample-dir>/<folder>/000000.png ..., where <folder> names every setting that changes
the images, then into <sample-dir>/<folder>.npz (arr_0: uint8 (N, H, W, 3), the format of the ADM
evaluation suite: https://github.com/openai/guided-diffusion/tree/main/evaluations).

Reproducible and resumable:
- image i's noise and label come from a generator seeded by (global seed, i);
- indices are cut into fixed blocks of --per-proc-batch-size, dealt to ranks in turn, and each block
  is always sampled as one batch; the SDE's noise (drawn from the global RNG inside the sampler) is
  seeded per block from the block's first index. So the images do not depend on the number of
  processes. They may depend on the batch size (SDE noise, adaptive ODE step sizes are chosen per
  batch), which is why the folder name includes it;
- a block with any PNG missing is sampled again (only its missing PNGs are written); PNGs are
  written to a temporary name and renamed, so a killed run leaves no half-written file and the
  same command continues where it stopped.
Works with NCCL on GPUs and with Gloo on CPU (torchrun), or as a plain single process.
"""
from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import math
import os
import re
import zipfile
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import sampling
from dequantize import DEQUANTIZATIONS, dequantize, image_bits_per_dim
from train_utils import (CenterCrop, DistContext, all_ranks_ok, atomic_write, barrier, cleanup_distributed,
                         create_logger, image_transform, non_negative_int, positive_int, setup_distributed)

PNG_NAME = re.compile(r"^\d{6,}\.png$")


#################################################################################
#                                 Command line                                  #
#################################################################################

def add_ddp_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-dir", type=str, default="samples")
    parser.add_argument("--per-proc-batch-size", type=positive_int, default=4)
    parser.add_argument("--num-fid-samples", type=positive_int, default=50_000,
                        help="number of images to sample (with --likelihood: to evaluate)")
    parser.add_argument("--global-seed", type=non_negative_int, default=0)
    parser.add_argument("--data-path", type=str, default=None,
                        help="with --likelihood: an ImageFolder of real images to evaluate "
                             "(default: evaluate freshly generated samples)")
    parser.add_argument("--dequantize", choices=DEQUANTIZATIONS, default=None,
                        help="with --likelihood of a pixel-space model: noise added to the 8-bit images "
                             "(default uniform; none: density at the bin centres, no bound)")
    parser.add_argument("--num-probes", type=positive_int, default=1,
                        help="with --likelihood: Hutchinson probes averaged per divergence (default 1)")
    parser.add_argument("--exact-trace", action="store_true",
                        help="with --likelihood: the exact divergence, one backward pass per dimension (small images)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser, args = sampling.parse_sampling_args(
        argv, description="Sample many images from a SiT (DDP), or evaluate log-likelihoods.",
        vae_default="ema", cfg_default=1.0, add_script_arguments=add_ddp_arguments)
    if args.data_path is not None and not args.likelihood:
        parser.error("--data-path is read only with --likelihood")
    if args.data_path is not None and not os.path.isdir(args.data_path):
        parser.error(f"--data-path {args.data_path!r} is not a folder")
    likelihood_flags = {"--dequantize": args.dequantize is not None, "--num-probes": args.num_probes != 1,
                        "--exact-trace": args.exact_trace}
    for flag, given in likelihood_flags.items():
        if given and not args.likelihood:
            parser.error(f"{flag} is read only with --likelihood")
    if args.exact_trace and args.num_probes != 1:
        parser.error("--exact-trace computes the divergence without probes: drop --num-probes")
    return args


#################################################################################
#                              Folder and file names                            #
#################################################################################

def short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def checkpoint_tag(ckpt: Optional[str]) -> str:
    """'pretrained', or the checkpoint's file stem plus a hash of where it is (two runs' 0400000.pt differ)."""
    if ckpt is None:
        return "pretrained"
    where = os.path.realpath(ckpt) if os.path.exists(ckpt) else ckpt
    stem = os.path.splitext(os.path.basename(ckpt.rstrip("/")))[0] or "ckpt"
    return f"{stem}-{short_hash(where)}"


def vae_tag(vae_name: Optional[str]) -> str:
    if vae_name is None:
        return "pixels"
    if vae_name in ("ema", "mse"):
        return vae_name
    return f"{os.path.basename(os.path.normpath(vae_name))}-{short_hash(os.path.realpath(vae_name))}"


def folder_name(args: argparse.Namespace, vae_name: Optional[str]) -> str:
    """A folder name made of every setting that changes the images."""
    parts = [args.model.replace("/", "-"), checkpoint_tag(args.ckpt), f"{args.image_size}px", f"vae-{vae_tag(vae_name)}",
             args.mode, args.sampling_method, f"steps-{args.num_sampling_steps}", f"cfg-{args.cfg_scale}",
             args.path_type, args.prediction, f"seed-{args.global_seed}", f"bs-{args.per_proc_batch_size}"]
    if args.mode == "ODE":
        parts += [f"atol-{args.atol}", f"rtol-{args.rtol}"] + (["reverse"] if args.reverse else [])
    else:
        parts += [args.diffusion_form, f"norm-{args.diffusion_norm}", f"last-{args.last_step}",
                  f"lastsize-{args.last_step_size}"]
    if args.sample_eps is not None:
        parts.append(f"eps-{args.sample_eps}")
    if args.cfg_scale > 1.0 and args.guide_all_channels:
        parts.append("allchannels")
    if args.cfg_scale > 1.0 and tuple(args.cfg_interval) != (0.0, 1.0):
        parts.append(f"interval-{args.cfg_interval[0]}-{args.cfg_interval[1]}")
    if args.precision != "tf32":  # other precisions give other images; the default keeps older folder names
        parts.append(f"prec-{args.precision}")
    return "-".join(str(part) for part in parts)


def png_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"{index:06d}.png")


def save_png(pixels: np.ndarray, path: str) -> None:
    """Write uint8 (H, W, 3) pixels as a PNG via a temporary name and a rename (no half-written PNG)."""
    atomic_write(path, functools.partial(Image.fromarray(pixels).save, format="PNG"), suffix=".png.tmp")


def npz_temporary_suffix(folder: str) -> str:
    """How the temporary name of <folder>.npz ends (atomic_write puts ".tmp-XXXXXXXX" before it): a
    hash of the folder's name, so a killed build's leftover is known to be this folder's."""
    return f"-{short_hash(os.path.basename(os.path.normpath(folder)))}.npz"


def remove_stale_temporary_files(folder: str) -> int:
    """Delete what a killed run left behind: temporary PNGs in folder, and temporary <folder>.npz
    files beside it (each may be gigabytes); returns how many."""
    parent, npz_suffix = os.path.dirname(os.path.normpath(folder)), npz_temporary_suffix(folder)
    stale = [os.path.join(folder, name) for name in os.listdir(folder) if name.startswith(".") and name.endswith(".tmp")]
    stale += [os.path.join(parent, name) for name in os.listdir(parent or ".")
              if name.startswith(".tmp-") and name.endswith(npz_suffix)]
    for path in stale:
        os.remove(path)
    return len(stale)


#################################################################################
#                              Work split across ranks                          #
#################################################################################

def index_blocks(num_images: int, block_size: int) -> list[range]:
    """Indices 0..num_images-1 cut into consecutive blocks of block_size (the last may be shorter)."""
    return [range(start, min(start + block_size, num_images)) for start in range(0, num_images, block_size)]


def blocks_of_rank(blocks: list[range], rank: int, world_size: int) -> list[range]:
    """Blocks dealt to ranks in turn: block k goes to rank k % world_size."""
    return blocks[rank::world_size]


def reduce_tensor(values: list[float], device: torch.device, op: Any) -> list[float]:
    """All-reduce a few numbers with `op` (SUM, MAX); the values themselves in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


#################################################################################
#                                    Sampling                                   #
#################################################################################

def sample_block(block: range, model: Any, vae: Any, sample_fn: Callable, args: argparse.Namespace,
                 device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
    """Images uint8 (n, H, W, 3) and labels (n,) of one block of indices."""
    latent_shape = (model.in_channels, model.config["input_size"], model.config["input_size"])
    z, y = sampling.noise_and_labels(block, args.global_seed, latent_shape, args.num_classes)
    torch.manual_seed(sampling.seed_for(args.global_seed, block.start, "sde"))  # the SDE's noise, per block
    latents = sampling.generate_latents(sample_fn, model, z.to(device), y.to(device), args)
    return sampling.to_uint8_hwc(sampling.decode_latents(vae, latents, args.precision)), y


def sample_images(ctx: DistContext, args: argparse.Namespace, model: Any, vae: Any, folder: str, logger: Any) -> None:
    """Write every missing PNG of indices 0..num_fid_samples-1 (all ranks take part)."""
    sample_fn = sampling.sample_fn_for_args(args)
    blocks = blocks_of_rank(index_blocks(args.num_fid_samples, args.per_proc_batch_size), ctx.rank, ctx.world_size)
    pending = [block for block in blocks if not all(os.path.exists(png_path(folder, i)) for i in block)]
    missing_here = sum(sum(not os.path.exists(png_path(folder, i)) for i in block) for block in pending)
    (total_missing,) = reduce_tensor([missing_here], ctx.device, dist.ReduceOp.SUM)
    (num_rounds,) = reduce_tensor([len(pending)], ctx.device, dist.ReduceOp.MAX)
    logger.info(f"{args.num_fid_samples - int(total_missing)} of {args.num_fid_samples} images already exist; "
                f"sampling {int(total_missing)} on {ctx.world_size} process(es)")
    progress = tqdm(total=int(total_missing), unit="img", disable=not ctx.is_main, dynamic_ncols=True)
    for round_index in range(int(num_rounds)):  # in lockstep, so rank 0 can count everyone's images
        written = 0
        if round_index < len(pending):
            block = pending[round_index]
            images, _ = sample_block(block, model, vae, sample_fn, args, ctx.device)
            for index, pixels in zip(block, images):
                if not os.path.exists(png_path(folder, index)):
                    save_png(pixels, png_path(folder, index))
                    written += 1
        (written_everywhere,) = reduce_tensor([written], ctx.device, dist.ReduceOp.SUM)
        progress.update(int(written_everywhere))
    progress.close()
    if sample_fn.nfe:
        logger.info(f"{sample_fn.nfe} model evaluations per batch (last batch)")


#################################################################################
#                                 The .npz file                                 #
#################################################################################

def npz_shape(path: str) -> Optional[tuple]:
    """The shape of arr_0 in an .npz, read from its header only (None if unreadable)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as stream:
            version = np.lib.format.read_magic(stream)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(stream)
            return tuple(shape) if dtype == np.uint8 else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def create_npz_from_sample_folder(folder: str, num: int) -> str:
    """Write <folder>.npz with arr_0: uint8 (num, H, W, 3) from 000000.png ...; returns its path.

    Streamed image by image (memory stays small for 50K images) into a temporary file, renamed
    when complete.
    """
    npz_path = f"{folder}.npz"
    first = np.asarray(Image.open(png_path(folder, 0)).convert("RGB"))
    write = functools.partial(write_npz_stream, folder, num, first.shape)
    atomic_write(npz_path, write, suffix=npz_temporary_suffix(folder))
    return npz_path


def write_npz_stream(folder: str, num: int, image_shape: tuple, path: str) -> None:
    """Write the PNGs 0 .. num-1 of folder, each of image_shape (H, W, 3), as arr_0 of an npz at path."""
    shape = (num, *image_shape)  # (N, H, W, 3)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as stream:
            np.lib.format.write_array_header_1_0(stream, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for index in tqdm(range(num), desc="Building .npz file from samples"):
                pixels = np.asarray(Image.open(png_path(folder, index)).convert("RGB"), dtype=np.uint8)
                if pixels.shape != image_shape:
                    raise SystemExit(f"error: {png_path(folder, index)} is {pixels.shape}, not {image_shape}")
                stream.write(pixels.tobytes())


def finish_npz(folder: str, num: int, logger: Any) -> None:
    """On rank 0: build <folder>.npz once all num PNGs exist (unless an identical one is there)."""
    missing = [index for index in range(num) if not os.path.exists(png_path(folder, index))]
    if missing:
        raise SystemExit(f"error: {len(missing)} images are still missing in {folder} (first: {missing[0]}); "
                         f"run the same command again")
    existing = npz_shape(f"{folder}.npz")
    if existing is not None and existing[0] == num:
        logger.info(f"{folder}.npz already holds {num} images {existing}")
        return
    path = create_npz_from_sample_folder(folder, num)
    logger.info(f"Saved .npz file to {path} [shape={npz_shape(path)}].")


#################################################################################
#                                   Likelihood                                  #
#################################################################################

def likelihood_inputs(block: range, dataset: Any, model: Any, vae: Any, sample_fn: Optional[Callable],
                      args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (n, C, L, L) and labels (n,) to evaluate: encoded real images, or fresh samples."""
    if dataset is not None:
        items = [dataset[index] for index in block]
        images = torch.stack([image for image, _ in items]).to(device)  # (n, 3, H, W) in [-1, 1]
        labels = torch.tensor([label for _, label in items], device=device)
        return sampling.encode_images(vae, images), labels
    latent_shape = (model.in_channels, model.config["input_size"], model.config["input_size"])
    z, y = sampling.noise_and_labels(block, args.global_seed, latent_shape, args.num_classes)
    return sampling.generate_latents(sample_fn, model, z.to(device), y.to(device), args), y.to(device)


def pixel_likelihood_inputs(block: range, dataset: Any, model: Any, sample_fn: Optional[Callable],
                            args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit images uint8 (n, 3, H, W) and labels (n,) to evaluate: real ones (dataset items are
    uint8), or fresh samples of a pixel-space model quantized as the PNGs would be."""
    if dataset is not None:
        items = [dataset[index] for index in block]
        images = torch.stack([image for image, _ in items])  # (n, 3, H, W) uint8
        return images, torch.tensor([label for _, label in items], device=device)
    samples, labels = likelihood_inputs(block, None, model, None, sample_fn, args, device)
    pixels = torch.from_numpy(sampling.to_uint8_hwc(sampling.decode_latents(None, samples)))  # (n, H, W, 3)
    return pixels.permute(0, 3, 1, 2), labels                                                  # (n, 3, H, W)


def image_likelihood(images: torch.Tensor, labels: torch.Tensor, model_fn: Callable, likelihood_fn: Callable,
                     dequantization: str, generator: torch.Generator,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bits/dim of 8-bit images under a pixel-space model.

    images: uint8 (n, 3, H, W); labels: (n,). The images are dequantized (noise from `generator`),
    mapped to the model's [-1, 1] scale, and the ODE gives log p(x); image_bits_per_dim adds the
    change of variables from [0, 256) and the dequantization density. Returns float64 (n,) tensors
    (log p(x) on the model's scale in nats, the negative bound on log P(image) in nats, bits/dim).
    """
    x, log_q = dequantize(images, dequantization, generator)  # (n, 3, H, W) float64, (n,)
    result = likelihood_fn(x.to(device, torch.float32), model_fn, y=labels)
    logp_x = result.logp.double().cpu()
    num_dims = x[0].numel()
    bits_per_dim = image_bits_per_dim(logp_x, log_q.cpu(), num_dims)
    return logp_x, bits_per_dim * num_dims * math.log(2), bits_per_dim


def open_dataset(args: argparse.Namespace, pixel_space: bool = False) -> Any:
    """The --data-path ImageFolder, center-cropped to the model's size (None without --data-path):
    images in [-1, 1], or uint8 (3, H, W) for pixel-space likelihoods (no flip either way)."""
    if args.data_path is None:
        return None
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    if pixel_space:
        transform = transforms.Compose([CenterCrop(args.image_size), transforms.PILToTensor()])
    else:
        transform = image_transform(args.image_size, random_flip=False)
    try:
        dataset = ImageFolder(args.data_path, transform=transform)
    except (FileNotFoundError, OSError) as error:
        raise SystemExit(f"error: --data-path {args.data_path}: {error}")
    if len(dataset.classes) > args.num_classes:
        raise SystemExit(f"error: --data-path has {len(dataset.classes)} class folders but the model has "
                         f"{args.num_classes} classes")
    return dataset


def evaluate_likelihood(ctx: DistContext, args: argparse.Namespace, model: Any, vae: Any, folder: str,
                        logger: Any) -> None:
    """Log-likelihood of real images (--data-path) or of fresh samples: per-image values to
    <folder>/likelihood.csv, the means over all ranks to the log."""
    if vae is None:
        evaluate_image_likelihood(ctx, args, model, folder, logger)
        return
    if args.dequantize is not None:
        raise SystemExit("error: --dequantize applies to pixel-space models (trained with --vae none); this one "
                         "works on VAE latents, whose likelihood is reported per latent dimension: drop --dequantize")
    dataset = open_dataset(args)
    num_images = args.num_fid_samples if dataset is None else min(args.num_fid_samples, len(dataset))
    sample_fn = None if dataset is not None else sampling.sample_fn_for_args(args)
    likelihood_fn = sampling.likelihood_fn_for_args(args)
    blocks = blocks_of_rank(index_blocks(num_images, args.per_proc_batch_size), ctx.rank, ctx.world_size)
    rows = []
    progress = tqdm(total=num_images, unit="img", disable=not ctx.is_main, dynamic_ncols=True)
    for block in blocks:
        latents, labels = likelihood_inputs(block, dataset, model, vae, sample_fn, args, ctx.device)
        torch.manual_seed(sampling.seed_for(args.global_seed, block.start, "likelihood"))  # Hutchinson probes
        result = likelihood_fn(latents, model.forward, y=labels)
        for index, label, logp, bpd in zip(block, labels.tolist(), result.logp.tolist(), result.bits_per_dim.tolist()):
            rows.append((index, label, logp, -logp, bpd))
        progress.update(min(len(block) * ctx.world_size, progress.total - progress.n))  # estimate: ranks run alike
    progress.close()
    all_rows = gather_rows(rows, ctx)
    if ctx.is_main:
        write_likelihood_csv(sorted(all_rows), os.path.join(folder, "likelihood.csv"))
        nll = float(np.mean([row[3] for row in all_rows]))
        bpd = float(np.mean([row[4] for row in all_rows]))
        source = f"images of {args.data_path}" if dataset is not None else "generated samples"
        logger.info(f"Likelihood of {len(all_rows)} {source}: mean NLL {nll:.4f} nats per image, "
                    f"{bpd:.6f} bits per latent dimension; per-image values in {folder}/likelihood.csv")


def evaluate_image_likelihood(ctx: DistContext, args: argparse.Namespace, model: Any, folder: str, logger: Any) -> None:
    """Bits/dim of 8-bit images (--data-path, or fresh samples) under a pixel-space model: per-image
    values to <folder>/likelihood.csv, the means over all ranks to the log."""
    dataset = open_dataset(args, pixel_space=True)
    num_images = args.num_fid_samples if dataset is None else min(args.num_fid_samples, len(dataset))
    sample_fn = None if dataset is not None else sampling.sample_fn_for_args(args)
    likelihood_fn = sampling.likelihood_fn_for_args(args)
    dequantization = args.dequantize or "uniform"
    blocks = blocks_of_rank(index_blocks(num_images, args.per_proc_batch_size), ctx.rank, ctx.world_size)
    rows = []
    progress = tqdm(total=num_images, unit="img", disable=not ctx.is_main, dynamic_ncols=True)
    for block in blocks:
        images, labels = pixel_likelihood_inputs(block, dataset, model, sample_fn, args, ctx.device)
        generator = torch.Generator().manual_seed(sampling.seed_for(args.global_seed, block.start, "dequantize"))
        torch.manual_seed(sampling.seed_for(args.global_seed, block.start, "likelihood"))  # Hutchinson probes
        logp_x, nll, bpd = image_likelihood(images, labels.to(ctx.device), model.forward, likelihood_fn,
                                            dequantization, generator, ctx.device)
        rows += zip(block, labels.tolist(), logp_x.tolist(), nll.tolist(), bpd.tolist())
        progress.update(min(len(block) * ctx.world_size, progress.total - progress.n))  # estimate: ranks run alike
    progress.close()
    all_rows = gather_rows(rows, ctx)
    if ctx.is_main:
        header = ["index", "label", "logp_x_nats", "nll_image_nats", "bits_per_dim"]
        write_likelihood_csv(sorted(all_rows), os.path.join(folder, "likelihood.csv"), header)
        bpd = float(np.mean([row[4] for row in all_rows]))
        source = f"images of {args.data_path}" if dataset is not None else "generated samples"
        divergence = "exact trace" if args.exact_trace else f"{args.num_probes} Hutchinson probe(s)"
        logger.info(f"Likelihood of {len(all_rows)} 8-bit {source} ({dequantization} dequantization, {divergence}): "
                    f"mean {bpd:.4f} bits/dim; per-image values in {folder}/likelihood.csv")


def gather_rows(rows: list, ctx: DistContext) -> list:
    """Every rank's rows, on every rank."""
    if ctx.world_size == 1:
        return rows
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


LATENT_LIKELIHOOD_HEADER = ["index", "label", "logp_nats", "nll_nats", "bits_per_dim"]


def write_likelihood_csv(rows: list, path: str, header: Sequence[str] = LATENT_LIKELIHOOD_HEADER) -> None:
    """One row per image under `header` (default: index, label, logp (nats), nll (nats), bits per
    latent dimension); via a temporary file."""
    tmp_path = f"{path}.{os.getpid()}.tmp"
    with open(tmp_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp_path, path)


#################################################################################
#                                     Main                                      #
#################################################################################

def agreed(ctx: DistContext, step: Optional[Callable[[], Any]], what: str) -> Any:
    """step() on this rank (None: nothing here), then agreement: if it failed on any rank, every rank
    exits with the first failing rank's one-line message, instead of the others waiting for it.

    A failure is a SystemExit (the scripts' refusals) or an OSError (reported as "error: <what>: ...").
    Every rank must call this at the same point (it is a collective).
    """
    result, message = None, None
    try:
        result = step() if step is not None else None
    except SystemExit as error:
        message = error.code if isinstance(error.code, str) else f"error: {what} (exit status {error.code})"
    except OSError as error:
        message = f"error: {what}: {error}"
    if all_ranks_ok(message is None, ctx.device):
        return result
    raise SystemExit(gather_rows([message] if message else [], ctx)[0])


def create_sample_folder(folder: str, logger: Any) -> None:
    """Create folder, clearing a killed run's temporary files, and say so."""
    os.makedirs(folder, exist_ok=True)
    removed = remove_stale_temporary_files(folder)
    logger.info(f"Saving to {folder}" + (f" (removed {removed} unfinished files)" if removed else ""))


def prepare_folder(ctx: DistContext, args: argparse.Namespace, vae_name: Optional[str], logger: Any) -> str:
    """Create <sample-dir>/<folder> on rank 0 (clearing a killed run's temporary files); if that
    fails, every rank exits with its message."""
    name = folder_name(args, vae_name)
    if args.likelihood:
        name += "-likelihood-" + (f"data-{checkpoint_tag(args.data_path)}" if args.data_path else "generated")
        if vae_name is None:  # pixel space: 8-bit images, dequantized
            name += f"-deq-{args.dequantize or 'uniform'}"
        if args.exact_trace or args.num_probes != 1:
            name += "-exact-trace" if args.exact_trace else f"-probes-{args.num_probes}"
    folder = os.path.join(args.sample_dir, name)
    create = functools.partial(create_sample_folder, folder, logger) if ctx.is_main else None
    agreed(ctx, create, f"cannot create the sample folder {folder}")
    return folder


def load_everything(ctx: DistContext, args: argparse.Namespace) -> tuple[Any, Any, Optional[str]]:
    """Model, VAE and VAE name: rank 0 first, so a download happens once, then the others; a
    failure on any rank ends every rank with its message."""
    load = functools.partial(load_model_and_vae, ctx, args)
    on_main = agreed(ctx, load if ctx.is_main else None, "cannot load the model")
    on_others = agreed(ctx, None if ctx.is_main else load, "cannot load the model")
    return on_main if ctx.is_main else on_others


def load_model_and_vae(ctx: DistContext, args: argparse.Namespace) -> tuple[Any, Any, Optional[str]]:
    """This rank's model and VAE (None in pixel space), and the VAE's name."""
    model, info = sampling.load_model_from_args(args, ctx.device)
    vae_name = sampling.vae_name_from_args(args, info, default="ema")
    return model, sampling.load_decoder(vae_name, ctx.device), vae_name


def run(ctx: DistContext, args: argparse.Namespace) -> None:
    logger = create_logger(None, ctx.is_main)
    logger.info(f"Starting rank={ctx.rank}, world_size={ctx.world_size}, device={ctx.device}")
    model, vae, vae_name = load_everything(ctx, args)
    folder = prepare_folder(ctx, args, vae_name, logger)
    if args.likelihood:
        evaluate_likelihood(ctx, args, model, vae, folder, logger)
        return
    sample_images(ctx, args, model, vae, folder, logger)
    barrier()  # every PNG is written before rank 0 reads them
    build = functools.partial(finish_npz, folder, args.num_fid_samples, logger) if ctx.is_main else None
    agreed(ctx, build, f"cannot write {folder}.npz")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    sampling.setup_torch(args.precision)
    ctx = setup_distributed()
    try:
        run(ctx, args)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
