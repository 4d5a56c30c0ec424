"""Training and sampling throughput: the original's loop against ours, side by side in one run.

    python benchmarks/bench.py --model SiT-S/2 --image-size 256 --batch-size 4            # CPU
    python benchmarks/bench.py --model SiT-XL/2 --batch-size 64 --precision bf16 --compile  # GPU

Baseline (`original_train_step`, a copy shaped like the original train.py, kept only for comparison):
fp32 weights (TF32 matmuls on GPU), the VAE encoding every batch, a per-parameter EMA loop, default
AdamW, eager, `loss.item()` every step.
Optimised: train.py's own step, `sit.training.step.train_step` (--precision autocast and GradScaler,
optional torch.compile, fused EMA and AdamW, --max-grad-norm clipping, no per-step sync), measured
from images (online VAE) and from cached latents (no VAE). Sampling: one guided ODE step and one
guided SDE step (forward_with_cfg on 2N inputs) of the `transport` sampler's drift: the original's
(`original_sde_drift`: eager fp32, the model evaluated twice, for the velocity and for the score)
against ours (--precision, --compile as sample.py's; one model evaluation per SDE drift).
Weights are random (speed does not depend on them); the VAE has the SD-VAE architecture.
Prints images/s, peak memory, model TFLOP/s (FlopCounterMode) and, on a known GPU, the
fraction of its dense bf16 peak.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import resource
import sys
import time
from collections import OrderedDict
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import SiT_models  # noqa: E402
from sit.cli import DefaultsInHelp, non_negative_int, positive_float, positive_int, run_main  # noqa: E402
from sit.config import TransportConfig  # noqa: E402
from sit.files import atomic_json, atomic_text  # noqa: E402
from sit.latents import SD_VAE_SCALE, latent_space, random_sd_vae  # noqa: E402
from sit.speed import PRECISIONS, autocast, compile_for_sampling, configure_precision  # noqa: E402
from sit.training.step import TrainStep, train_step  # noqa: E402
from transport import Sampler  # noqa: E402

SD_VAE = latent_space("ema")  # the geometry of random_sd_vae's network (SD-VAE's); nothing is loaded
MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Dense bf16 tensor-core peaks (TFLOP/s) of GPUs we know, by a substring of their name.
GPU_BF16_PEAK = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "4090": 165.0}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsInHelp)
    parser.add_argument("--model", choices=list(SiT_models), default="SiT-S/2", help="the SiT measured (random weights)")
    parser.add_argument("--image-size", type=positive_int, default=256, help="a multiple of 8")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="images per training and sampler step")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bf16", help="precision of the optimised rows")
    parser.add_argument("--compile", action="store_true", help="torch.compile the optimised rows, as the scripts' --compile")
    parser.add_argument("--max-grad-norm", type=positive_float, default=None,
                        help="clip the gradient norm in the optimised step, as train.py's flag (default: no clipping)")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps first (compilation happens here)")
    parser.add_argument("--skip-baseline-train", action="store_true", help="only when the baseline does not fit")
    parser.add_argument("--train-only", action="store_true",
                        help="measure the training steps only, not the sampler steps (e.g. one block's MFU)")
    parser.add_argument("--json", type=str, default=None, help="also write the measured rows to this JSON file")
    parser.add_argument("--profile", nargs="?", const="bench-profile", default=None, metavar="DIR",
                        help="also write where the time of one step goes (torch.profiler's operator and kernel table) "
                             "to DIR/<step>.txt (default DIR: bench-profile): the cached-latents training step, the "
                             "baseline and the optimised ODE step")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory since the last reset, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def time_steps(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per call of step, after warmup calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """TFLOP/s of a plain (size x size) matmul in dtype on the device: what the model's matmuls can reach."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = time_steps(functools.partial(torch.mm, a, b), device, repeats, 2)
    return 2 * size ** 3 / seconds / 1e12


#################################################################################
#          The original's training step: a baseline copy, for comparison only   #
#################################################################################

def original_update_ema(ema_model, model, decay=0.9999):
    """The original's EMA: one multiply-add per parameter, looked up by name."""
    ema_params = OrderedDict(ema_model.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def original_train_step(model, ema, opt, vae, transport, images: torch.Tensor, labels: torch.Tensor) -> None:
    """The original train.py's step (baseline only): encode images (N, 3, H, W), fp32 loss, plain
    AdamW step, per-parameter EMA, and a host sync for the logged loss."""
    with torch.no_grad():
        x = vae.encode(images).latent_dist.sample().mul_(SD_VAE_SCALE)
    loss = transport.training_losses(model, x, dict(y=labels))["loss"].mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    original_update_ema(ema, model)
    loss.item()


class TrainBench:
    """One model and the batches to time its training steps on: images and cached latents."""

    def __init__(self, args: argparse.Namespace, device: torch.device, vae):
        latent = SD_VAE.input_size(args.image_size)
        self.model = SiT_models[args.model](input_size=latent).to(device).train()
        self.transport = TransportConfig().build()
        self.device, self.vae = device, vae
        self.images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
        self.labels = torch.randint(0, 1000, (args.batch_size,), device=device)
        self.latent_mean = torch.randn(args.batch_size, SD_VAE.channels, latent, latent, device=device)
        self.latent_std = torch.rand_like(self.latent_mean) * 0.1

    def baseline_seconds(self, args: argparse.Namespace) -> float:
        """Seconds per step of the original's loop (its own EMA copy and default AdamW)."""
        ema = copy.deepcopy(self.model).requires_grad_(False)
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0)
        step = functools.partial(original_train_step, self.model, ema, opt, self.vae, self.transport, self.images,
                                 self.labels)
        return time_steps(step, self.device, args.steps, args.warmup)

    def library_steps(self, args: argparse.Namespace) -> dict[str, Callable[[], None]]:
        """train.py's step (sit.training.step) as train.py builds it, from images and from cached latents."""
        from_images = TrainStep.create(self.model, transport=self.transport, device=self.device, lr=1e-4,
                                       compile_blocks=args.compile, vae=self.vae, precision=args.precision,
                                       max_grad_norm=args.max_grad_norm)
        from_latents = dataclasses.replace(from_images, vae=None, from_features=True)  # the same model, EMA, AdamW
        return {"from images": functools.partial(train_step, from_images, [self.images], self.labels),
                "cached latents": functools.partial(train_step, from_latents, [self.latent_mean, self.latent_std],
                                                    self.labels)}

    def training_flops(self) -> int:
        """FLOPs of one training forward and backward of the model (VAE excluded)."""
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.randn_like(self.latent_mean)
        t = torch.rand(x.shape[0], device=self.device)
        with FlopCounterMode(display=False) as counter:
            self.model(x, t, self.labels).sum().backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops()


#################################################################################
#                               Sampler steps                                   #
#################################################################################

def guided_inputs(batch: int, latent: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Doubled noise (2N, 4, L, L), times (2N,) and labels (2N,) with the null label in the second half."""
    x = torch.randn(2 * batch, SD_VAE.channels, latent, latent, device=device)
    t = torch.full((2 * batch,), 0.5, device=device)
    y = torch.cat([torch.randint(0, 1000, (batch,), device=device), torch.full((batch,), 1000, device=device)])
    return x, t, y


def ode_step_fn(model, batch: int, latent: int, device: torch.device, precision: str) -> Callable[[], None]:
    """One guided ODE step: the drift is one forward_with_cfg on (2N, 4, L, L)."""
    x, t, y = guided_inputs(batch, latent, device)
    drift = Sampler(TransportConfig().build()).drift

    def step():
        with torch.no_grad(), autocast(precision, device):
            drift(x, t, model.forward_with_cfg, y=y, cfg_scale=4.0)

    return step


def original_sde_drift(sampler: Sampler, diffusion: Callable, x: torch.Tensor, t: torch.Tensor, model_fn: Callable,
                       **kwargs) -> torch.Tensor:
    """The original's SDE drift v + w(t) * score (baseline only): the model evaluated once for the
    velocity and again for the score."""
    return sampler.drift(x, t, model_fn, **kwargs) + diffusion(x, t) * sampler.score(x, t, model_fn, **kwargs)


def sde_step_fn(model, batch: int, latent: int, device: torch.device, precision: str, original: bool) -> Callable[[], None]:
    """One guided SDE step's drift v + w(t) * score: the sampler's own (one model evaluation for
    both), or with `original` the baseline's original_sde_drift."""
    x, t, y = guided_inputs(batch, latent, device)
    sampler = Sampler(TransportConfig().build())
    sde_drift, diffusion = sampler._sde_drift_and_diffusion(diffusion_form="sigma")
    drift = functools.partial(original_sde_drift, sampler, diffusion) if original else sde_drift

    def step():
        with torch.no_grad(), autocast(precision, device):
            drift(x, t, model.forward_with_cfg, y=y, cfg_scale=4.0)

    return step


def interleaved_seconds(steps: list[Callable[[], None]], device: torch.device, rounds: int, warmup: int) -> list[float]:
    """The fastest time of each step over `rounds` rounds that run them in turn: timing noise from
    the rest of the machine hits all steps alike and the minimum drops it."""
    for step in steps:
        for _ in range(warmup):
            step()
    best = [float("inf")] * len(steps)
    for _ in range(rounds):
        for position, step in enumerate(steps):
            best[position] = min(best[position], time_steps(step, device, 1, 0))
    return best


def sampling_flops(model, batch: int, latent: int, device: torch.device) -> int:
    """FLOPs of one forward_with_cfg on (2N, 4, L, L): one guided ODE drift."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, y = guided_inputs(batch, latent, device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward_with_cfg(x, t, y, 4.0)
    return counter.get_total_flops()


PROFILE_ROWS = 40  # operators (on a GPU: kernels) per table, the most expensive first


def write_profile(folder: str, name: str, step: Callable[[], None], device: torch.device) -> str:
    """Profile one call of step (after a warm-up call) and write torch.profiler's table to folder/<name>.txt:
    on a GPU sorted by the kernels' own GPU time (the kernel table), on a CPU by the operators' own CPU
    time. Returns the file's path."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    step()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]) as prof:
        step()
        synchronize(device)
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    path = os.path.join(folder, f"{name}.txt")
    os.makedirs(folder, exist_ok=True)
    atomic_text(path, f"{name}: one step on {device}, sorted by {sort_by}\n"
                      + prof.key_averages().table(sort_by=sort_by, row_limit=PROFILE_ROWS) + "\n")
    print(f"profile of {name}: {path}", flush=True)
    return path


def measure_sampling(args: argparse.Namespace, device: torch.device, rows: dict, peak: float) -> None:
    """ODE and SDE sampler steps: the original's (eager fp32) against ours (--precision, --compile),
    interleaved."""
    latent = SD_VAE.input_size(args.image_size)
    model = SiT_models[args.model](input_size=latent).to(device).eval()
    flops = sampling_flops(model, args.batch_size, latent, device)
    fast_model = compile_for_sampling(copy.deepcopy(model)) if args.compile else model  # sample.py's --compile
    configure_precision(args.precision)  # only GPUs read it: the baseline's TF32 equals the default tf32
    for name in ("ODE", "SDE"):
        if name == "ODE":
            steps = [ode_step_fn(model, args.batch_size, latent, device, "fp32"),
                     ode_step_fn(fast_model, args.batch_size, latent, device, args.precision)]
        else:
            steps = [sde_step_fn(model, args.batch_size, latent, device, "fp32", original=True),
                     sde_step_fn(fast_model, args.batch_size, latent, device, args.precision, original=False)]
        baseline_flops = 2 * flops if name == "SDE" else flops  # the original's SDE drift: two forwards
        reset_peak_memory(device)
        baseline, optimised = interleaved_seconds(steps, device, max(args.steps, 3), max(args.warmup, 1))
        rows[f"{name} baseline"] = report(f"{name} sampler step, baseline (original)", baseline, args.batch_size,
                                          peak_memory_gib(device), baseline_flops, peak)
        rows[f"{name} optimised"] = report(f"{name} sampler step, optimised", optimised, args.batch_size,
                                           peak_memory_gib(device), flops, peak)
        if args.profile and name == "ODE":
            write_profile(args.profile, "ode-step-baseline", steps[0], device)
            write_profile(args.profile, "ode-step-optimised", steps[1], device)


def report(name: str, seconds: float, batch: int, memory: float, flops: int = 0, peak: float = 0.0) -> dict:
    row = dict(name=name, images_per_s=batch / seconds, seconds=seconds, memory_gib=memory,
               tflops=flops / seconds / 1e12 if flops else 0.0)
    extra = f"  {row['tflops']:7.3f} TFLOP/s" if flops else ""
    if flops and peak:
        extra += f" ({100 * row['tflops'] / peak:.0f}% of bf16 peak)"
    print(f"{name:42s} {row['images_per_s']:9.2f} img/s  {seconds * 1000:9.1f} ms/step  peak mem {memory:6.2f} GiB{extra}", flush=True)
    return row


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    SD_VAE.check_image_size(args.image_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak = next((value for key, value in GPU_BF16_PEAK.items() if key in device_name), 0.0)
    print(f"device: {device_name}; torch {torch.__version__}; {args.model} at {args.image_size}px, batch {args.batch_size}; "
          f"optimised: {args.precision}{' + compile' if args.compile else ''}", flush=True)
    configure_precision("fp32")
    speeds = {name: matmul_tflops(device, dtype) for name, dtype in MATMUL_DTYPES.items()}
    print("matmul (2048 x 2048) on this device: " + ", ".join(f"{name} {value:.3f}" for name, value in speeds.items())
          + " TFLOP/s", flush=True)
    torch.manual_seed(0)
    vae = random_sd_vae().to(device).requires_grad_(False)  # Stable Diffusion's VAE architecture
    bench = TrainBench(args, device, vae)
    flops = bench.training_flops()
    rows = {}

    if not args.skip_baseline_train:
        configure_precision("tf32")  # the original: fp32 weights, TF32 matmuls on GPU
        reset_peak_memory(device)
        seconds = bench.baseline_seconds(args)
        rows["baseline"] = report("train, baseline (original loop)", seconds, args.batch_size, peak_memory_gib(device), flops, peak)

    configure_precision(args.precision)
    for label, step in bench.library_steps(args).items():  # train.py's --compile applies to both (after the EMA copy)
        reset_peak_memory(device)
        seconds = time_steps(step, device, args.steps, args.warmup)
        rows[label] = report(f"train, optimised, {label}", seconds, args.batch_size, peak_memory_gib(device), flops, peak)
        if args.profile and label == "cached latents":
            write_profile(args.profile, "train-step-cached-latents", step, device)

    if not args.train_only:
        measure_sampling(args, device, rows, peak)

    print()
    if "baseline" in rows:
        for label in ("from images", "cached latents"):
            print(f"training speed-up, {label}: {rows[label]['images_per_s'] / rows['baseline']['images_per_s']:.2f}x")
    for mode in ("ODE", "SDE"):
        if f"{mode} optimised" not in rows:  # --train-only
            continue
        speed_up = rows[f"{mode} optimised"]["images_per_s"] / rows[f"{mode} baseline"]["images_per_s"]
        print(f"sampling speed-up, {mode} step: {speed_up:.2f}x")
    if args.json:
        atomic_json(args.json, dict(device=device_name, bf16_peak_tflops=peak, torch=torch.__version__, model=args.model,
                                    image_size=args.image_size, batch_size=args.batch_size, precision=args.precision,
                                    compile=args.compile, max_grad_norm=args.max_grad_norm, rows=rows))


if __name__ == "__main__":
    sys.exit(run_main(main, "bench.py"))
