"""Every GPU path of the project, run once, in one command (<= 8 minutes on one GPU):

    python benchmarks/device_check.py                    # everything; exit 1 if any check FAILs
    python benchmarks/device_check.py --only parity sdpa  # some checks (names below)

Prints a table (check | result | figure | tolerance): golden parity of the model and of one ODE and
one SDE sample against the original's recording (fp32), bf16/fp16 autocast training of SiT-S/2
against fp32, --compile without recompiles over training and sampler steps, the SDPA kernel picked
for SiT-XL/2's attention in bf16 (and for LightningDiT-XL/1's, RoPE and QK-norm on), a world-size-1
process group through torchrun's setup (NCCL on a GPU) with FSDP2 steps, no host sync inside the training
step, sample.py end to end on a random SiT-XL/2 and SD-VAE, benchmarks/bench.py for SiT-XL/2 at 256 (batch
64, bf16, compile) against the original-style loop, with the speed targets, the MFU of LightningDiT-XL/1's
training step (its block options on, 256 tokens as at 256 px), and train.py and sample_ddp.py
timed through their own logs against bench.py's steps (docs/speed.md; an estimated 4 of the 8 minutes:
`--skip scripts` if short of time).
On a CPU the checks whose code runs there use small sizes and the CUDA-only ones say SKIPPED (exit 0).
Results: PASS, FAIL, SKIPPED (the figure says why), MISS (a speed target not reached, which fails
the run only with --strict-targets) and INFO (a measured figure without a target).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from copy import deepcopy
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from models import Attention, SiT, SiT_models, rope_tables  # noqa: E402
from sit.checkpoint import TrainCheckpoint  # noqa: E402
from sit.cli import DefaultsInHelp, run_main  # noqa: E402
from sit.distributed import agree, all_reduce_mean, cleanup_distributed, setup_distributed  # noqa: E402
from sit.errors import RunFailure  # noqa: E402
from sit.files import atomic_json  # noqa: E402
from sit.speed import autocast, compile_for_sampling, configure_precision  # noqa: E402
from sit.training.sharding import Sharding  # noqa: E402
from sit.training.step import TrainStep, train_step  # noqa: E402
from sit.latents import random_sd_vae  # noqa: E402
from transport import Sampler, create_transport  # noqa: E402

FIXTURE = os.path.join(REPO, "tests", "fixtures", "parity.pt")
WIDTHS = (44, 7, 70)  # check, result, figure; the tolerance ends the line
PARITY_RTOL = 1e-4        # model outputs against the original's recording, fp32 with TF32 off
SAMPLE_RTOL = 1e-3        # ODE/SDE samples against the recording (test_parity's bound)
AUTOCAST_LOSS_RTOL = 1e-2  # bf16/fp16 training losses against fp32, at every step (test_speed's bound)
FSDP_LOSS_RTOL = 1e-6     # FSDP2 on one rank against the unsharded step, fp32
TRAIN_SPEEDUP, PEAK_FRACTION, SAMPLING_SPEEDUP = 3.0, 0.40, 2.0  # the speed targets on a GPU
FUSED_SDPA = ("flash", "efficient", "cudnn")  # substrings of the fused SDPA kernels' aten names


@dataclass
class Row:
    check: str
    result: str
    figure: str
    tolerance: str


@dataclass
class CheckContext:
    """Where the checks run: the device, the repository (for scripts), a scratch folder, the parity fixture."""
    device: torch.device
    repo: str
    scratch: str
    fixture: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, on the CPU."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def bound_row(check: str, value: float, bound: float, what: str) -> Row:
    return Row(check, "PASS" if value <= bound else "FAIL", f"{what} {value:.2e}", f"<= {bound:.0e}")


def skipped(check: str, reason: str) -> Row:
    return Row(check, "SKIPPED", reason, "-")


#################################################################################
#                 Golden parity: the original's recorded outputs                #
#################################################################################

def model_outputs(model: SiT, case: dict, device: torch.device) -> torch.Tensor:
    """forward(x, t, y), or forward_with_cfg with the case's cfg_scale, on the device."""
    args = [case[key].to(device) for key in ("x", "t", "y")]
    with torch.no_grad():
        return model.forward_with_cfg(*args, case["cfg_scale"]) if "cfg_scale" in case else model(*args)


def sample_case(model: SiT, section: dict, case: dict, device: torch.device) -> torch.Tensor:
    """A recorded ODE or SDE case's final sample (the SDE's noise is drawn on the CPU generator, so a
    seed gives the same sample on any device)."""
    sampler = Sampler(create_transport(case["path_type"], case["prediction"]))
    if "diffusion_form" not in case:
        sample_fn = sampler.sample_ode(sampling_method=case["sampling_method"], num_steps=case["num_steps"],
                                       reverse=case.get("reverse", False))
    else:
        sample_fn = sampler.sample_sde(sampling_method=case["sampling_method"], diffusion_form=case["diffusion_form"],
                                       diffusion_norm=case["diffusion_norm"], last_step=case["last_step"],
                                       last_step_size=case["last_step_size"], num_steps=case["num_steps"])
        torch.manual_seed(case["seed"])
    with torch.no_grad():
        return sample_fn(section["z"].to(device), model.forward, y=section["y"].to(device))[-1]


def cpu_reference() -> dict:
    """Without the recording: a tiny random model's outputs on the CPU, in the recording's layout
    (a GPU is then held to the CPU; on a CPU the check only proves that the code runs)."""
    torch.manual_seed(0)
    config = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    model = SiT(**config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param), alpha=0.05)
    inputs = dict(x=torch.randn(2, 4, 8, 8), t=torch.rand(2), y=torch.tensor([1, 2]))
    guided = dict(x=torch.cat([inputs["x"]] * 2), t=torch.cat([inputs["t"]] * 2), y=torch.tensor([1, 2, 10, 10]),
                  cfg_scale=3.0)
    common = dict(path_type="Linear", prediction="velocity", cfg_scale=1.0, num_steps=8)
    reference = dict(config=config, state_dict=model.state_dict(), forward=inputs, forward_with_cfg=guided,
                     ode=dict(z=torch.randn(2, 4, 8, 8), y=inputs["y"], cases=[dict(common, sampling_method="euler")]),
                     sde=dict(z=torch.randn(2, 4, 8, 8), y=inputs["y"],
                              cases=[dict(common, sampling_method="Euler", diffusion_form="sigma", diffusion_norm=1.0,
                                          last_step="Mean", last_step_size=0.04, seed=5)]))
    for key in ("forward", "forward_with_cfg"):
        reference[key]["out"] = model_outputs(model, reference[key], torch.device("cpu"))
    for key in ("ode", "sde"):
        case = reference[key]["cases"][0]
        case["final"] = sample_case(model, reference[key], case, torch.device("cpu"))
    return reference


def golden_model(ctx: CheckContext) -> tuple[dict, SiT]:
    """The recording (tests/fixtures/parity.pt, else cpu_reference) and its model on the device (fp32, TF32 off)."""
    recorded = os.path.isfile(ctx.fixture)
    golden = torch.load(ctx.fixture, map_location="cpu", weights_only=True) if recorded else cpu_reference()
    model = SiT(**golden["config"])
    model.load_state_dict(golden["state_dict"], strict=True)
    configure_precision("fp32")
    return golden, model.to(ctx.device).eval()


def check_model_parity(ctx: CheckContext) -> list[Row]:
    golden, model = golden_model(ctx)
    error = max(relative_error(model_outputs(model, golden[key], ctx.device), golden[key]["out"])
                for key in ("forward", "forward_with_cfg"))
    return [bound_row(f"model parity fp32 on {ctx.device.type}", error, PARITY_RTOL, "max rel err")]


def check_sampler_parity(ctx: CheckContext) -> list[Row]:
    """The first fixed-step unguided ODE case and the first unguided Euler SDE case."""
    golden, model = golden_model(ctx)
    rows = []
    for mode in ("ode", "sde"):
        section = golden[mode]
        case = next(case for case in section["cases"] if case["sampling_method"].lower() == "euler"
                    and case["cfg_scale"] == 1.0)
        rows.append(bound_row(f"{mode.upper()} sample parity fp32 on {ctx.device.type}",
                              relative_error(sample_case(model, section, case, ctx.device), case["final"]),
                              SAMPLE_RTOL, "rel err"))
    return rows


#################################################################################
#                       Mixed precision and torch.compile                       #
#################################################################################

def training_batch(ctx: CheckContext, batch: int, latent: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Cached-latent inputs [mean, std] (N, 4, L, L) each, and labels (N,), from a fixed generator."""
    generator = torch.Generator().manual_seed(3)
    mean = torch.randn(batch, 4, latent, latent, generator=generator)
    std = torch.rand(batch, 4, latent, latent, generator=generator) * 0.1
    labels = torch.randint(0, 1000, (batch,), generator=generator)
    return [mean.to(ctx.device), std.to(ctx.device)], labels.to(ctx.device)


def training_losses(ctx: CheckContext, model: SiT, steps: int, batch: int, **step_options) -> list[float]:
    """Losses of train.py's step (cached latents) on one fixed batch for `steps` steps, the noise seeded alike."""
    step = TrainStep.create(model.to(ctx.device), transport=create_transport(), device=ctx.device, lr=1e-4,
                            from_features=True, **step_options)
    inputs, labels = training_batch(ctx, batch, model.config["input_size"])
    torch.manual_seed(0)
    return [train_step(step, inputs, labels).loss.item() for _ in range(steps)]


def sit_s2(ctx: CheckContext) -> SiT:
    """SiT-S/2 at 256 px (32x32 latents) on a GPU, at 64 px (8x8) on a CPU; seeded."""
    torch.manual_seed(0)
    return SiT_models["SiT-S/2"](input_size=32 if ctx.cuda else 8)


def check_autocast_training(ctx: CheckContext) -> list[Row]:
    steps, batch = (20, 32) if ctx.cuda else (5, 4)
    configure_precision("fp32")
    reference = training_losses(ctx, sit_s2(ctx), steps, batch, precision="fp32")
    rows = []
    for precision in ("bf16", "fp16"):
        losses = training_losses(ctx, sit_s2(ctx), steps, batch, precision=precision)
        worst = max(abs(low - full) / full for low, full in zip(losses, reference))
        rows.append(bound_row(f"{precision} autocast training SiT-S/2 vs fp32", worst, AUTOCAST_LOSS_RTOL,
                              f"{steps} steps, max rel loss diff"))
    return rows


@contextlib.contextmanager
def dynamo_counting() -> Iterator[dict]:
    """Fresh dynamo state and counters; yields the counters."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def compile_row(check: str, counters: dict, warm: int, steps: int) -> Row:
    """PASS when no graph was added after the warm-up and none broke."""
    added, breaks = counters["stats"]["unique_graphs"] - warm, sum(counters["graph_break"].values())
    return Row(check, "PASS" if added == 0 and breaks == 0 and warm > 0 else "FAIL",
               f"{warm} graph(s) after warm-up; +{added} over {steps} steps, {breaks} breaks", "+0 graphs, 0 breaks")


def check_compile(ctx: CheckContext) -> list[Row]:
    """train.py --compile over training steps (new t and noise every step), then sample.py --compile
    over guided ODE steps at new times (CUDA only: on a CPU its kernel autotuning takes minutes)."""
    batch = 8 if ctx.cuda else 2
    inputs, labels = training_batch(ctx, batch, 32 if ctx.cuda else 8)
    with dynamo_counting() as counters:
        step = TrainStep.create(sit_s2(ctx).to(ctx.device), transport=create_transport(), device=ctx.device, lr=1e-4,
                                from_features=True, compile_blocks=True, precision="bf16" if ctx.cuda else "fp32")
        train_step(step, inputs, labels)
        warm = counters["stats"]["unique_graphs"]
        for _ in range(4):
            train_step(step, inputs, labels)
        rows = [compile_row("compile: train.py training steps", counters, warm, 4)]
    if not ctx.cuda:
        reason = "CUDA only: CPU autotuning takes minutes (tests/test_speed.py)"
        return rows + [skipped("compile: sample.py sampler steps", reason)]
    with dynamo_counting() as counters, torch.no_grad():
        model = compile_for_sampling(deepcopy(step.ema))
        z = torch.randn(batch, *inputs[0].shape[1:], device=ctx.device)
        guided = dict(y=torch.cat([labels, torch.full_like(labels, 1000)]), cfg_scale=4.0)
        sampler, doubled = Sampler(create_transport()), torch.cat([z, z])  # (2N, 4, L, L)
        with autocast("bf16", ctx.device):
            sampler.sample_ode(sampling_method="euler", num_steps=2)(doubled, model.forward_with_cfg, **guided)
            warm = counters["stats"]["unique_graphs"]
            sampler.sample_ode(sampling_method="euler", num_steps=7)(doubled, model.forward_with_cfg, **guided)
        rows.append(compile_row("compile: sample.py sampler steps", counters, warm, 6))
    return rows


def sdpa_row(ctx: CheckContext, check: str, attention: Attention, rope: Optional[tuple] = None) -> Row:
    """Which SDPA kernel PyTorch picks for this attention over 4 x 256 tokens in bf16 (profiler), and that
    forward and backward run with only flash/memory-efficient enabled."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    attention = attention.to(ctx.device)
    rope = rope and tuple(table.to(ctx.device) for table in rope)
    x = torch.randn(4, 256, attention.proj.in_features, device=ctx.device, requires_grad=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with profile(activities=activities) as prof, autocast("bf16", ctx.device):
        attention(x, rope).float().sum().backward()
    picked = sorted({event.name.removeprefix("aten::") for event in prof.events() if "scaled_dot_product" in event.name
                     and "backward" not in event.name and event.name != "aten::scaled_dot_product_attention"})
    fused = bool(picked) and all(any(kind in name for kind in FUSED_SDPA) for name in picked)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), autocast("bf16", ctx.device):
            attention(x, rope).float().sum().backward()
        restricted = "flash/efficient-only run OK"
    except RuntimeError as error:
        fused, restricted = False, f"flash/efficient-only run failed: {str(error).splitlines()[0][:80]}"
    return Row(f"{check} bf16 on {ctx.device.type}", "PASS" if fused else "FAIL", f"{', '.join(picked) or 'none'}; "
               f"{restricted}", "flash or memory-efficient")


def check_sdpa(ctx: CheckContext) -> list[Row]:
    """The SDPA kernel of SiT-XL/2's attention (16 heads of 72), and of LightningDiT-XL/1's with 2-D RoPE
    over its 16 x 16 patches and QK-norm (RMSNorm) on: q and k are turned and normalised before the one
    SDPA call, which must stay a fused kernel."""
    return [sdpa_row(ctx, "SDPA kernel, XL/2 shapes", Attention(1152, 16)),
            sdpa_row(ctx, "SDPA kernel, XL/1 RoPE+QK-norm", Attention(1152, 16, qk_norm=True, rms_norm=True),
                     rope_tables(16, 72))]


#################################################################################
#                 Process group and FSDP2 through torchrun's setup              #
#################################################################################

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def one_rank_job() -> Iterator:
    """setup_distributed as under `torchrun --nproc_per_node=1` (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT set); the process group and the environment are restored after."""
    launch = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    saved = {key: os.environ.get(key) for key in launch}
    os.environ.update(launch)
    try:
        yield setup_distributed(timeout_minutes=2)
    finally:
        cleanup_distributed()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def small_sit() -> SiT:
    """2 blocks, width 64, perturbed output layers (so that every weight learns); seeded."""
    torch.manual_seed(0)
    model = SiT(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=1000)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param), alpha=0.02 if param.requires_grad else 0.0)
    return model


def fsdp_losses(ctx: CheckContext, job, steps: int, **step_options) -> list[float]:
    """Losses of the step sharded by FSDP2 (--sharding fsdp) over the job's one rank."""
    sharding = Sharding("fsdp", step_options.get("precision", "fp32"))
    model = small_sit().to(ctx.device)
    sharding.wrap(model, job)  # every rank takes rank 0's weights; TrainStep.create shards
    return training_losses(ctx, model, steps, 4, sharding=sharding, **step_options)


def check_process_group(ctx: CheckContext) -> list[Row]:
    """A world-size-1 job (NCCL on a GPU, Gloo on a CPU): a collective, rank agreement, then FSDP2
    training steps against the unsharded step (fp32), and with bf16, compile, gradient checkpointing
    and clipping (the flags a large run combines) against fp32."""
    configure_precision("fp32")
    reference = training_losses(ctx, small_sit(), 3, 4)
    with one_rank_job() as job:
        backend = dist.get_backend()
        value = all_reduce_mean(torch.full((1,), 3.0, device=job.device)).item()
        agreed = agree(job, lambda: "ok")
        rows = [Row(f"process group ({backend}), world size 1", "PASS" if (value, agreed) == (3.0, "ok") else "FAIL",
                    f"all_reduce_mean 3 -> {value:g}; agree -> {agreed}", "exact")]
        worst = max(abs(a - b) / b for a, b in zip(fsdp_losses(ctx, job, 3), reference))
        rows.append(bound_row("FSDP2 step (world size 1) vs unsharded", worst, FSDP_LOSS_RTOL,
                              "3 steps, max rel loss diff"))
        with dynamo_counting():
            combined = fsdp_losses(ctx, job, 3, precision="bf16", compile_blocks=True, grad_checkpointing=True,
                                   max_grad_norm=1.0)
        worst = max(abs(a - b) / b for a, b in zip(combined, reference))
        rows.append(bound_row("FSDP2 bf16+compile+ckpt+clip vs fp32", worst, AUTOCAST_LOSS_RTOL,
                              "3 steps, max rel loss diff"))
    return rows


#################################################################################
#                       The scripts, end to end                                 #
#################################################################################

def run_script(ctx: CheckContext, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, *args], cwd=ctx.scratch, env=env, capture_output=True, text=True,
                          timeout=timeout)


def failure_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr or result.stdout).strip().splitlines()
    return f"exit {result.returncode}: {lines[-1][:100] if lines else 'no output'}"


def check_sample_script(ctx: CheckContext) -> list[Row]:
    """sample.py on a random SiT-XL/2 and a random SD-VAE (GPU), or a tiny SiT and VAE (CPU), saved here."""
    torch.manual_seed(0)
    if ctx.cuda:
        name, model, vae, image_size = "SiT-XL/2", SiT_models["SiT-XL/2"](input_size=32), random_sd_vae(), 256
    else:
        name, image_size = "tiny SiT", 32
        model = SiT(input_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=1000)
        vae = random_sd_vae(widths=(8, 8, 8, 8), layers_per_block=1, norm_groups=4)
    vae_folder, checkpoint = os.path.join(ctx.scratch, "vae"), os.path.join(ctx.scratch, "random.pt")
    vae.save_pretrained(vae_folder)
    weights = model.state_dict()
    TrainCheckpoint(model=weights, ema=weights, opt={}, settings=dict(vae=vae_folder, image_size=image_size),
                    model_config=model.config, train_steps=0).save(checkpoint)
    output = os.path.join(ctx.scratch, "grid.png")
    result = run_script(ctx, [os.path.join(ctx.repo, "sample.py"), "ODE", "--ckpt", checkpoint, "--vae", vae_folder,
                              "--class-labels", "1,2,3,4", "--sampling-method", "euler", "--num-sampling-steps", "4",
                              "--output", output] + (["--precision", "bf16"] if ctx.cuda else []), timeout=300)
    if result.returncode != 0:
        return [Row(f"sample.py end to end, {name}", "FAIL", failure_line(result), "exit 0, 4-image grid")]
    with Image.open(output) as grid:
        size = grid.size
    expected = (4 * (image_size + 2) + 2, image_size + 4)
    return [Row(f"sample.py end to end, {name}", "PASS" if size == expected else "FAIL",
                f"grid {size[0]}x{size[1]}", f"exit 0, grid {expected[0]}x{expected[1]}")]


def target_row(check: str, value: float, target: float, figure: str) -> Row:
    return Row(check, "PASS" if value >= target else "MISS", figure, f">= {target:g} (target)")


BLOCK_BENCH = ("LightningDiT-XL/1", "128")  # SD-VAE's 16 x 16 latents at 128 px: VA-VAE's 256 tokens at 256 px


def check_bench(ctx: CheckContext, batch_size: int = 64) -> list[Row]:
    """benchmarks/bench.py for SiT-XL/2 at 256 (bf16, compile) against the original-style loop, in one run;
    then the training step of LightningDiT's block (RoPE, SwiGLU, RMSNorm, QK-norm) for its MFU alone."""
    if not ctx.cuda:
        return [skipped("bench.py SiT-XL/2 and LightningDiT-XL/1, batch 64, bf16, compile",
                        "needs a GPU (tests/test_bench.py runs it tiny on CPU)")]
    speed = ["--batch-size", str(batch_size), "--precision", "bf16", "--compile", "--json"]
    record_path, block_path = os.path.join(ctx.scratch, "bench.json"), os.path.join(ctx.scratch, "bench-block.json")
    result = run_script(ctx, [os.path.join(ctx.repo, "benchmarks", "bench.py"), "--model", "SiT-XL/2", "--image-size",
                              "256", *speed, record_path], timeout=420)
    if result.returncode != 0:
        return [Row("bench.py SiT-XL/2", "FAIL", failure_line(result), "exit 0")]
    with open(record_path) as handle:
        table = bench_rows(json.load(handle))
    model, image_size = BLOCK_BENCH
    result = run_script(ctx, [os.path.join(ctx.repo, "benchmarks", "bench.py"), "--model", model, "--image-size",
                              image_size, "--skip-baseline-train", "--train-only", *speed, block_path], timeout=240)
    if result.returncode != 0:
        return [*table, Row(f"bench.py {model}", "FAIL", failure_line(result), "exit 0")]
    with open(block_path) as handle:
        return [*table, peak_row(f"bench: {model} fraction of bf16 peak", json.load(handle))]


def peak_row(check: str, record: dict) -> Row:
    """The cached-latents training step's TFLOP/s of a bench.py --json record against the GPU's dense bf16
    peak (INFO when the GPU's peak is unknown)."""
    best, peak = record["rows"]["cached latents"], record["bf16_peak_tflops"]
    if not peak:
        return Row(check, "INFO", f"{best['tflops']:.0f} TFLOP/s; peak of {record['device']} unknown", "-")
    return target_row(check, best["tflops"] / peak, PEAK_FRACTION,
                      f"{best['tflops']:.0f} TFLOP/s of {peak:.0f}: {100 * best['tflops'] / peak:.0f}%")


def bench_rows(record: dict) -> list[Row]:
    """The speed rows of a bench.py --json record against the issue's targets (MISS below a target)."""
    rows = record["rows"]
    speed = {name: rows[name]["images_per_s"] for name in rows}
    best, training = rows["cached latents"], speed["cached latents"] / speed["baseline"]
    table = [target_row("bench: training vs original loop", training, TRAIN_SPEEDUP,
                        f"{speed['cached latents']:.0f} img/s (cached latents) vs {speed['baseline']:.0f}: "
                        f"{training:.2f}x; from images {speed['from images']:.0f}"),
             peak_row("bench: fraction of bf16 peak", record)]
    for mode in ("ODE", "SDE"):
        ratio = speed[f"{mode} optimised"] / speed[f"{mode} baseline"]
        table.append(target_row(f"bench: {mode} sampler step vs original", ratio, SAMPLING_SPEEDUP, f"{ratio:.2f}x"))
    table.append(Row("bench: peak memory, training", "INFO", f"{best['memory_gib']:.1f} GiB (cached latents), "
                     f"{rows['baseline']['memory_gib']:.1f} GiB (original loop)", "-"))
    return table


#################################################################################
#          The real scripts against the benchmark's steps (same settings)       #
#################################################################################

SCRIPT_TRAIN_FRACTION, SCRIPT_SAMPLE_FRACTION, SCRIPT_SAMPLE_SPEEDUP = 0.97, 0.90, 5.0  # the targets
SCRIPT_STEPS, SCRIPT_IMAGES, SCRIPT_TRAIN_STEPS = 50, 192, 40  # SDE steps, images sampled, training steps
TRAIN_RATE = re.compile(r"Images/Sec: ([0-9.]+)")
SAMPLE_RATE = re.compile(r"after the first batch \(warm-up, compilation\): ([0-9.]+) img/s")


def logged_rate(text: str, pattern: re.Pattern) -> Optional[float]:
    """The last rate a script's log gives (train.py's Images/Sec, sample_ddp.py's img/s), or None."""
    found = pattern.findall(text)
    return float(found[-1]) if found else None


def script_rows(train_rate: float, sample_rate: float, record: Optional[dict], sde_steps: int) -> list[Row]:
    """train.py's and sample_ddp.py's logged img/s against bench.py's record for the same settings (None:
    the bench check did not run): the training step from cached latents, the SDE step (one model
    evaluation of the batch; sde_steps of them make an image) and the original-style SDE step, whose
    sde_steps evaluations without VAE decode or PNGs are a lower bound of the original script's time."""
    if record is None:
        return [Row("scripts: train.py, cached latents", "INFO", f"{train_rate:.1f} img/s (bench not run)", "-"),
                Row("scripts: sample_ddp.py SDE", "INFO", f"{sample_rate:.2f} img/s (bench not run)", "-")]
    speed = {name: row["images_per_s"] for name, row in record["rows"].items()}
    train = train_rate / speed["cached latents"]
    sample = sample_rate * sde_steps / speed["SDE optimised"]
    original = sample_rate / (speed["SDE baseline"] / sde_steps)
    return [target_row("scripts: train.py / bench step", train, SCRIPT_TRAIN_FRACTION,
                       f"{train_rate:.1f} vs {speed['cached latents']:.1f} img/s (cached latents): {train:.3f}"),
            target_row("scripts: sample_ddp.py / bench SDE step", sample, SCRIPT_SAMPLE_FRACTION,
                       f"{sample_rate:.2f} img/s x {sde_steps} steps vs {speed['SDE optimised']:.1f}: {sample:.3f}"),
            target_row("scripts: sample_ddp.py / original-style SDE", original, SCRIPT_SAMPLE_SPEEDUP,
                       f"{sample_rate:.2f} vs <= {speed['SDE baseline'] / sde_steps:.2f} img/s: {original:.2f}x")]


def random_image_folder(folder: str, count: int, size: int) -> str:
    """count random RGB images of size x size in one class folder."""
    os.makedirs(os.path.join(folder, "class0"), exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(os.path.join(folder, "class0", f"{index:05d}.png"))
    return folder


def check_scripts(ctx: CheckContext, batch_size: int = 64) -> list[Row]:
    """train.py (SiT-XL/2 at 256, cached latents, bf16, compile, batch 64) and sample_ddp.py (SDE, 50 steps,
    bf16, compile, batch 64) timed through their own logs, against the bench check's record (run it first)."""
    if not ctx.cuda:
        return [skipped("scripts: train.py, sample_ddp.py vs bench",
                        "needs a GPU (the rows: tests/test_device_check.py)")]
    torch.manual_seed(0)
    vae_folder, features = os.path.join(ctx.scratch, "vae"), os.path.join(ctx.scratch, "features")
    if not os.path.isdir(vae_folder):
        random_sd_vae().save_pretrained(vae_folder)
    images = random_image_folder(os.path.join(ctx.scratch, "images"), 10 * batch_size, 256)
    speed = ["--precision", "bf16", "--compile"]
    result = run_script(ctx, [os.path.join(ctx.repo, "extract_features.py"), "--data-path", images, "--features-path",
                              features, "--vae", vae_folder, "--batch-size", str(batch_size)], timeout=180)
    if result.returncode != 0:
        return [Row("scripts: extract_features.py", "FAIL", failure_line(result), "exit 0")]
    result = run_script(ctx, [os.path.join(ctx.repo, "train.py"), "--feature-path", features, "--model", "SiT-XL/2",
                              "--image-size", "256", "--global-batch-size", str(batch_size), "--max-steps",
                              str(SCRIPT_TRAIN_STEPS), "--log-every", str(SCRIPT_TRAIN_STEPS // 2), "--sample-every",
                              "1000000", "--background-checkpoints", "--results-dir",
                              os.path.join(ctx.scratch, "results"), *speed], timeout=300)
    train_rate = logged_rate(result.stdout + result.stderr, TRAIN_RATE)
    if result.returncode != 0 or train_rate is None:
        return [Row("scripts: train.py", "FAIL", failure_line(result), "exit 0, Images/Sec logged")]
    result = run_script(ctx, [os.path.join(ctx.repo, "sample_ddp.py"), "SDE", "--ckpt",
                              os.path.join(ctx.scratch, "results"), "--vae", vae_folder, "--num-fid-samples",
                              str(SCRIPT_IMAGES), "--per-proc-batch-size", str(batch_size), "--num-sampling-steps",
                              str(SCRIPT_STEPS), "--cfg-scale", "4.0", "--sample-dir",  # bench's guided steps: 2N inputs
                              os.path.join(ctx.scratch, "samples"), *speed], timeout=300)
    sample_rate = logged_rate(result.stdout + result.stderr, SAMPLE_RATE)
    if result.returncode != 0 or sample_rate is None:
        return [Row("scripts: sample_ddp.py", "FAIL", failure_line(result), "exit 0, img/s logged")]
    record_path = os.path.join(ctx.scratch, "bench.json")
    record = None
    if os.path.isfile(record_path):
        with open(record_path) as handle:
            record = json.load(handle)
    return script_rows(train_rate, sample_rate, record, SCRIPT_STEPS)


def check_host_sync(ctx: CheckContext) -> list[Row]:
    """train.py's step (bf16, cached latents) under CUDA's sync debug mode: no host synchronisation inside."""
    if not ctx.cuda:
        return [skipped("no host sync inside the training step", "CUDA only (a CPU step never waits for a device)")]
    inputs, labels = training_batch(ctx, 8, 32)
    step = TrainStep.create(sit_s2(ctx).to(ctx.device), transport=create_transport(), device=ctx.device, lr=1e-4,
                            from_features=True, precision="bf16")
    train_step(step, inputs, labels)  # the first step allocates AdamW's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(step, inputs, labels)
        result, figure = "PASS", "no synchronising call"
    except RuntimeError as error:
        result, figure = "FAIL", str(error).splitlines()[0][:70]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [Row("no host sync inside the training step", result, figure, "none")]


# --only/--skip name -> check (in the order they run: the scripts, which take longest, last)
CHECKS: dict[str, Callable[[CheckContext], list[Row]]] = {
    "parity": check_model_parity, "sampler": check_sampler_parity, "autocast": check_autocast_training,
    "compile": check_compile, "sync": check_host_sync, "sdpa": check_sdpa, "distributed": check_process_group,
    "sample": check_sample_script, "bench": check_bench, "scripts": check_scripts,
}


def run_checks(names: list[str], repo: str, device: torch.device, fixture: str,
               report: Callable[[str, list[Row], float], None]) -> list[Row]:
    """Run the named checks in a scratch folder; a check that raises is one FAIL row with its error.
    report(name, rows, seconds) is called after each."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="device_check_") as scratch:
        ctx = CheckContext(device=device, repo=repo, scratch=scratch, fixture=fixture)
        for name in names:
            start = time.perf_counter()
            try:
                found = CHECKS[name](ctx)
            except Exception as error:  # one failing check must not hide the others
                first_line = str(error).splitlines()[0][:100] if str(error) else ""
                found = [Row(name, "FAIL", f"{type(error).__name__}: {first_line}", "-")]
            rows.extend(found)
            report(name, found, time.perf_counter() - start)
    return rows


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsInHelp)
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), default=None, help="run only these checks")
    parser.add_argument("--skip", nargs="+", choices=list(CHECKS), default=[], help="leave these checks out")
    parser.add_argument("--strict-targets", action="store_true", help="a speed target missed (MISS) fails the run too")
    parser.add_argument("--json", type=str, default=None, help="also write the rows to this JSON file")
    return parser.parse_args(argv)


def format_row(row: Row) -> str:
    cells = [row.check, row.result, row.figure]
    return " | ".join(cell.ljust(width) for cell, width in zip(cells, WIDTHS)) + f" | {row.tolerance}"


def report(name: str, rows: list[Row], seconds: float) -> None:
    """Each check's rows as soon as it ends (a long run shows progress), with its time on stderr."""
    for row in rows:
        print(format_row(row), flush=True)
    print(f"  ({name}: {seconds:.1f} s)", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    """Run the checks and print the table; RunFailure (exit 1) naming the checks that failed."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    print(format_row(Row("check", "result", "figure", "tolerance")), flush=True)
    names = [check for check in (args.only or CHECKS) if check not in args.skip]
    rows = run_checks(names, REPO, device, FIXTURE, report)
    failing = {"FAIL", "MISS"} if args.strict_targets else {"FAIL"}
    failed = [row.check for row in rows if row.result in failing]
    counts = {result: sum(row.result == result for row in rows) for result in ("PASS", "FAIL", "MISS", "SKIPPED", "INFO")}
    print("summary: " + ", ".join(f"{count} {result}" for result, count in counts.items() if count), flush=True)
    if args.json:
        atomic_json(args.json, dict(device=name, torch=torch.__version__, rows=[vars(row) for row in rows]))
    if failed:
        raise RunFailure(f"{len(failed)} check(s) failed: {'; '.join(failed)}")


if __name__ == "__main__":
    sys.exit(run_main(main, "device_check.py"))
