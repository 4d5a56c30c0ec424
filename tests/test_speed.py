"""Speed features: --precision, --compile, cached latents (--feature-path), gradient checkpointing,
gradient clipping, persistent workers.

Proves: a training step from cached features equals one from images given equal noise (bitwise);
train.py --feature-path runs without any VAE, checkpoints and resumes exactly (persistent workers
against none); compiled blocks never recompile across training or sampler steps and have no graph
breaks; gradient checkpointing gives the same gradients; bf16 training tracks fp32 losses; fp16
keeps fp32 weights, EMA and optimizer state; the precision flags resolve and refuse contradictions.
"""
import functools
import json
import os
import re
import subprocess
import sys
from copy import deepcopy
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, make_image_folder

import train
from models import SiT
from sit.data.images import TrainImageFolder
from sit.data.order import ResumableDistributedSampler
from sit.distributed import DistContext
from sit.latents import SD_VAE_SCALE
from sit.speed import PRECISIONS, compile_for_sampling, compile_model
from sit.training.lr_schedule import LRSchedule
from sit.training.optimizer import make_optimizer
from sit.training.step import TrainStep, train_step, training_latents
from transport import Sampler, create_transport

CPU = torch.device("cpu")
TINY_CONFIG = {"depth": 1, "hidden_size": 32, "num_heads": 2}
TINY = ["--model", "SiT-S/2", "--model-config", json.dumps(TINY_CONFIG), "--image-size", "32", "--num-classes", "2"]
LOSS_LINE = re.compile(r"\(step=(\d{7})\) Train Loss: ([0-9.]+)")


def tiny_sit(depth: int = 1, input_size: int = 4, seed: int = 0) -> SiT:
    torch.manual_seed(seed)
    model = SiT(input_size=input_size, patch_size=2, hidden_size=32, depth=depth, num_heads=2, num_classes=2)
    for param in model.parameters():  # the zero-initialised output layers would make every gradient trivial
        if param.requires_grad:
            param.data.add_(0.05 * torch.randn_like(param))
    return model


def fake_step(model: SiT, *, features: bool, precision: str = "fp32", vae=None, max_grad_norm=None) -> TrainStep:
    """train.py's training step for `model` in one CPU process (from cached latents with `features`)."""
    return TrainStep.create(model, transport=create_transport(), device=CPU, lr=1e-4, vae=vae, from_features=features,
                            precision=precision, ema_decay=0.9999, max_grad_norm=max_grad_norm)


def tiny_vae_module():
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32).eval()


#################################################################################
#                     Cached features == images, given equal noise              #
#################################################################################

def test_training_step_from_features_equals_step_from_images_given_equal_noise():
    vae = tiny_vae_module().requires_grad_(False)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    mean, std = posterior.mean.clone(), posterior.std.clone()  # what extract_features.py stores (float32 here)

    model = tiny_sit()
    from_images = fake_step(deepcopy(model), features=False, vae=vae, max_grad_norm=1e-3)
    from_features = fake_step(deepcopy(model), features=True, max_grad_norm=1e-3)
    torch.manual_seed(7)
    step_images = train_step(from_images, [images], labels)
    torch.manual_seed(7)
    step_features = train_step(from_features, [mean, std], labels)

    assert torch.equal(step_images.loss, step_features.loss)
    for name, param in from_images.model.state_dict().items():
        assert torch.equal(param, from_features.model.state_dict()[name]), name
    # --max-grad-norm returned the norm before clipping, the same on both paths, and clipped to 1e-3
    norm_images, norm_features = step_images.grad_norm, step_features.grad_norm
    assert torch.equal(norm_images, norm_features) and norm_images.item() > 1e-3
    # the fresh latent itself is what the VAE samples with the same draw of torch.randn
    torch.manual_seed(3)
    expected = posterior.sample() * SD_VAE_SCALE
    torch.manual_seed(3)
    assert torch.equal(training_latents(from_features, [mean, std]), expected)


def test_sampler_items_carry_the_epoch_for_persistent_workers(tmp_path):
    folder = make_image_folder(str(tmp_path / "images"), num_classes=1, per_class=4)
    dataset = TrainImageFolder(folder, 32, seed=0)
    sampler = ResumableDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0, with_epoch=True)
    sampler.set_epoch(3, skip=1)
    items = list(sampler)
    assert len(items) == 3 and all(epoch == 3 for epoch, _ in items)
    for epoch in range(4):  # an (epoch, index) item is the image of that epoch, whatever set_epoch said
        dataset.set_epoch(epoch)
        by_epoch = dataset[0][0]
        dataset.set_epoch(99)
        assert torch.equal(dataset[(epoch, 0)][0], by_epoch)


#################################################################################
#                    train.py --feature-path: runs, resumes exactly             #
#################################################################################

def run_script(script: str, args: list, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd, env=env, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, f"{script} exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def load_checkpoint(path: str) -> dict:
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def feature_runs(tmp_path_factory, tiny_vae):
    """8 images cached; batch 4 = 2 steps an epoch. 5 steps straight with 2 persistent workers, and
    3 steps + --resume to 5 without workers (crossing epochs, so flips must follow the epoch)."""
    root = tmp_path_factory.mktemp("features")
    make_image_folder(str(root / "data"), num_classes=2, per_class=4)
    run_script("extract_features.py", ["--data-path", str(root / "data"), "--features-path", str(root / "feat"),
                                       "--image-size", "32", "--vae", tiny_vae, "--batch-size", "4",
                                       "--block-size", "4", "--num-workers", "0", "--float32"], str(root))
    common = ["--feature-path", str(root / "feat"), *TINY, "--global-batch-size", "4", "--log-every", "1",
              "--ckpt-every", "100000", "--sample-every", "100000", "--max-grad-norm", "10"]
    straight = run_script("train.py", [*common, "--results-dir", str(root / "straight"), "--max-steps", "5",
                                       "--num-workers", "2"], str(root))
    run_script("train.py", [*common, "--results-dir", str(root / "cut"), "--max-steps", "3", "--num-workers", "0"], str(root))
    resumed = run_script("train.py", [*common, "--results-dir", str(root / "cut"), "--resume", "--max-steps", "5",
                                      "--num-workers", "0"], str(root))
    return dict(root=root, straight=straight, resumed=resumed)


@pytest.mark.slow
def test_feature_path_training_resumes_exactly(feature_runs):
    root = feature_runs["root"]
    (straight_dir,), (cut_dir,) = os.listdir(root / "straight"), os.listdir(root / "cut")
    straight = load_checkpoint(str(root / "straight" / straight_dir / "checkpoints" / "0000005.pt"))
    resumed = load_checkpoint(str(root / "cut" / cut_dir / "checkpoints" / "0000005.pt"))
    assert (resumed["train_steps"], resumed["epoch"], resumed["epoch_step"]) == (5, 2, 1)
    for key in ("model", "ema"):
        for name, value in straight[key].items():
            assert torch.equal(value, resumed[key][name]), f"{key}.{name} differs"
    with open(root / "straight" / straight_dir / "log.txt") as handle:
        straight_log = handle.read()
    with open(root / "cut" / cut_dir / "log.txt") as handle:
        cut_log = handle.read()
    assert LOSS_LINE.findall(straight_log) == LOSS_LINE.findall(cut_log) and len(LOSS_LINE.findall(cut_log)) == 5
    assert "Grad Norm:" in straight_log
    assert straight["args"]["feature_path"] == str(root / "feat") and straight["args"]["data_path"] is None


def write_tiny_features(folder: str, vae: str) -> str:
    """A complete feature folder of 4 images (2 classes, 32 px): every latent mean is 0.5 for the
    image and -0.5 for its flip, std 0.1."""
    from sit.data.features import open_arrays, write_meta

    os.makedirs(folder)
    meta = dict(image_size=32, vae=vae, num_images=4, classes=["a", "b"], dtype="float32", block_size=4,
                latent_shape=[4, 4, 4], data_path="unused", complete=False)
    mean, std, labels = open_arrays(folder, meta, "w+")  # (4, 2, 4, 4, 4) x 2, (4,)
    mean[:, 0], mean[:, 1], std[:], labels[:] = 0.5, -0.5, 0.1, [0, 1, 0, 1]
    mean.flush(), std.flush(), labels.flush()
    write_meta(folder, dict(meta, complete=True))
    return folder


def test_no_random_flip_reaches_the_feature_dataset(tmp_path, tiny_vae):
    from sit.training.data import open_training_data
    from train_configs import resolve_train_config

    feat = write_tiny_features(str(tmp_path / "feat"), tiny_vae)
    for flag, means in (("--random-flip", {0.5, -0.5}), ("--no-random-flip", {0.5})):
        args, explicit = train.parse_args(["--feature-path", feat, *TINY, flag])
        dataset = open_training_data(resolve_train_config(vars(args), explicit)[0])
        seen = {dataset[(epoch, index)][0][0, 0, 0].item() for epoch in range(4) for index in range(4)}
        assert seen == means, flag


def test_every_rank_takes_the_same_collectives_around_a_feature_path_preview(tmp_path, monkeypatch):
    """--feature-path with --sample-every and --fid-every in a 2-process job, rank by rank in-process:
    rank 0 loads a VAE for the preview grid, yet both ranks join the same checks (a rank skipping
    one would leave the other waiting forever) and both decode the FID samples with a VAE."""
    import sit.distributed
    import sit.training.decoder
    import sit.training.loop
    from sit.log import create_logger
    from sit.training.decoder import RunVAE

    collectives, loads = [], []  # what each rank reports at each agreement: whether it failed
    monkeypatch.setattr(sit.distributed, "any_rank", lambda failed, device, group=None: collectives.append(failed) or failed)
    monkeypatch.setattr(sit.training.decoder, "load_latent_space",
                        lambda name, device: loads.append(name) or f"vae {name}")
    monkeypatch.setattr(sit.training.loop, "save_preview", lambda *args: None)
    traces = {}
    for rank in (0, 1):
        collectives.clear(), loads.clear()
        ctx = DistContext(rank=rank, world_size=2, local_rank=rank, device=CPU)
        run = sit.training.loop.TrainingRun(
            config=SimpleNamespace(run=SimpleNamespace(cfg_scale=4.0)), ctx=ctx,
            vae=RunVAE.at_start(ctx, "ema", from_features=True), experiment_dir=str(tmp_path) if rank == 0 else None,
            state=sit.training.loop.TrainState(2), logger=create_logger(None, False), wandb_run=None,
            step=SimpleNamespace(ema=None, transport=None), preview=None, dataset=None, loader=None, sampler=None,
            stop=None, monitor=None, term_factories=[])
        sit.training.loop.save_samples(run)  # step 2: the preview grid
        decoders = [run.vae.for_fid(ctx) for _ in range(2)]  # FID at steps 2 and 4
        traces[rank] = (list(collectives), list(loads), decoders)
    assert traces[0] == traces[1] == ([False, False], ["ema"], ["vae ema", "vae ema"])


def test_feature_path_loads_no_vae_unless_a_preview_is_due(tmp_path, tiny_vae, monkeypatch):
    """In-process: the VAE loaders are replaced by counters; 2 steps without a preview load none,
    with --sample-every 2 rank 0 loads one once for the grid."""
    feat = write_tiny_features(str(tmp_path / "feat"), tiny_vae)
    loads = []

    def counting_load_vae(name, device):
        loads.append(name)
        return tiny_vae_module().requires_grad_(False)

    def refuse(*args, **kwargs):
        raise AssertionError("the online-VAE loader must not run with --feature-path")

    def no_signal_handlers(self):
        pass

    import sit.training.decoder
    from sit.training.signals import StopSignal

    monkeypatch.setattr(StopSignal, "install", no_signal_handlers)
    monkeypatch.setattr(sit.training.decoder, "load_latent_space", counting_load_vae)
    monkeypatch.setattr(sit.training.decoder, "load_on_all_ranks", refuse)
    base = ["--feature-path", feat, *TINY, "--global-batch-size", "2", "--num-workers", "0", "--max-steps", "2",
            "--ckpt-every", "100000", "--log-every", "1"]
    train.main([*base, "--results-dir", str(tmp_path / "a"), "--sample-every", "100000"])
    assert loads == []
    train.main([*base, "--results-dir", str(tmp_path / "b"), "--sample-every", "2"])
    assert loads == [tiny_vae]  # the features' VAE, as no --vae was given
    (experiment,) = os.listdir(tmp_path / "b")
    assert os.listdir(tmp_path / "b" / experiment / "samples") == ["0000002.png"]


#################################################################################
#                       torch.compile: no recompiles, no breaks                 #
#################################################################################

def test_compiled_blocks_fuse_each_adaln_modulation_with_its_layer_norm():
    """Under --compile (compile_model), Inductor writes each LayerNorm and its adaLN modulation (shift,
    scale) as one kernel, the second one with the gated residual before it: no LayerNorm pass of its own.
    Read from the CPU's generated kernels, whose fusion comes from the scheduler GPUs share."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = compile_model(tiny_sit(depth=1, input_size=8)).eval()
    block = model.blocks[0]
    with torch.no_grad():
        _, code = run_and_get_code(block, torch.randn(2, 16, 32), torch.randn(2, 32))
    kernels = re.findall(r"\b(cpp_fused_\w+) = ", "\n".join(code))  # one name per generated kernel
    norms = [name for name in kernels if "layer_norm" in name]
    assert len(norms) == 2, kernels  # norm1 and norm2
    assert all("add" in name and "mul" in name for name in norms), norms


def test_compiled_blocks_do_not_recompile_across_training_and_sampler_steps():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = tiny_sit(depth=2)
    model = compile_model(deepcopy(eager))
    transport = create_transport()
    opt = make_optimizer(model)
    x1, y = torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 0, 1])

    graphs_after = []
    for _ in range(3):  # training steps: new x0 and t each step
        loss = transport.training_losses(model, x1, dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        graphs_after.append(counters["stats"]["unique_graphs"])
    assert graphs_after[0] >= 1 and graphs_after[0] == graphs_after[-1]

    model.eval()
    eager.load_state_dict(model.state_dict())
    eager.eval()
    sampler = Sampler(transport)
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        # warm up each batch shape once (shapes are static: batch 2 plain, batch 4 guided)
        sampler.sample_ode(sampling_method="euler", num_steps=2)(z, model.forward, y=y[:2])
        sampler.sample_ode(sampling_method="euler", num_steps=2)(torch.cat([z, z]), model.forward_with_cfg,
                                                                   y=torch.tensor([0, 1, 2, 2]), cfg_scale=2.0)
        warm = counters["stats"]["unique_graphs"]
        ode = sampler.sample_ode(sampling_method="euler", num_steps=6)(z, model.forward, y=y[:2])[-1]
        torch.manual_seed(0)
        sde = sampler.sample_sde(num_steps=5)(torch.cat([z, z]), model.forward_with_cfg, y=torch.tensor([0, 1, 2, 2]),
                                                cfg_scale=2.0)[-1]
        assert counters["stats"]["unique_graphs"] == warm  # t changes every step: still no new graph
        ode_eager = sampler.sample_ode(sampling_method="euler", num_steps=6)(z, eager.forward, y=y[:2])[-1]
        torch.manual_seed(0)
        sde_eager = sampler.sample_sde(num_steps=5)(torch.cat([z, z]), eager.forward_with_cfg,
                                                      y=torch.tensor([0, 1, 2, 2]), cfg_scale=2.0)[-1]
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert torch.allclose(ode, ode_eager, atol=1e-5) and torch.allclose(sde, sde_eager, atol=1e-5)


@pytest.mark.slow
def test_compiled_sampling_model_matches_eager_and_never_recompiles(monkeypatch):
    """sample.py --compile: the whole forward compiled with frozen weights; guided ODE steps at new
    times reuse one graph and equal eager to 1e-5."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    monkeypatch.setattr(inductor_config, "freezing", False)  # restored after the test
    torch._dynamo.reset()
    counters.clear()
    eager = tiny_sit(depth=2).eval()
    model = compile_for_sampling(deepcopy(eager))
    z = torch.randn(2, 4, 4, 4)
    guided = dict(y=torch.tensor([0, 1, 2, 2]), cfg_scale=2.0)
    sampler = Sampler(create_transport())
    with torch.no_grad():
        sampler.sample_ode(sampling_method="euler", num_steps=2)(torch.cat([z, z]), model.forward_with_cfg, **guided)
        warm = counters["stats"]["unique_graphs"]
        fast = sampler.sample_ode(sampling_method="euler", num_steps=6)(torch.cat([z, z]), model.forward_with_cfg, **guided)[-1]
        reference = sampler.sample_ode(sampling_method="euler", num_steps=6)(torch.cat([z, z]), eager.forward_with_cfg, **guided)[-1]
    assert warm >= 1 and counters["stats"]["unique_graphs"] == warm
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert ((fast - reference).abs().max() / reference.abs().max()).item() <= 1e-5


#################################################################################
#                 Gradient checkpointing, mixed precision numerics              #
#################################################################################

# aten ops that make a GPU host wait for the device: a value read back (.item(), bool(), int()) or an output
# whose size depends on the values
HOST_READS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.masked_select", "aten.unique")


class HostReads(TorchDispatchMode):
    """Records the ops in HOST_READS run inside it, except reads of the tensors at `ignored` (data pointers)."""

    def __init__(self, ignored: set[int]):
        super().__init__()
        self.ignored, self.reads = ignored, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(HOST_READS) and not (args and args[0].data_ptr() in self.ignored):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision, max_grad_norm, schedule", [("fp32", None, None), ("bf16", 1.0, "warmup-cosine")])
def test_the_training_step_reads_nothing_back_from_the_device(precision, max_grad_norm, schedule):
    """train.py's step (loss, backward, clipping, lr schedule, AdamW, EMA) reads no value back to the host,
    checked on the CPU by the aten ops it runs (device_check.py checks the same under CUDA's sync debug
    mode). AdamW's step counters are exempt: on a GPU they live on the host, or the fused kernel reads them."""
    step = fake_step(tiny_sit(depth=2, input_size=8), features=True, precision=precision, max_grad_norm=max_grad_norm)
    if schedule is not None:
        step.lr_schedule = LRSchedule(schedule, 1e-4, warmup_steps=1, total_steps=10)
    mean, std, labels = torch.randn(4, 4, 8, 8), torch.rand(4, 4, 8, 8), torch.tensor([0, 1, 1, 0])
    train_step(step, [mean, std], labels)  # the first step allocates AdamW's state
    counters = {state["step"].data_ptr() for state in step.opt.state.values()}
    with HostReads(counters) as mode:
        result = train_step(step, [mean, std], labels)
    assert mode.reads == []
    assert torch.isfinite(result.loss) and (max_grad_norm is None) == (result.grad_norm is None)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_sit(depth=2)
    x, t, y = torch.randn(3, 4, 4, 4), torch.rand(3), torch.tensor([0, 1, 1])
    gradients = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.grad_checkpointing = checkpointing
        torch.manual_seed(0)  # label dropout draws random numbers
        model(x, t, y).square().sum().backward()
        gradients.append({name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 10
    for name, grad in gradients[0].items():
        assert torch.allclose(grad, gradients[1][name], rtol=1e-5, atol=1e-7), name


def train_losses(precision: str, steps: int = 6) -> tuple[list[float], object]:
    """Losses of `steps` feature-path train steps of a tiny model (hidden 32, depth 1) at a precision."""
    step = fake_step(tiny_sit(input_size=8), features=True, precision=precision)
    generator = torch.Generator().manual_seed(1)
    mean, std = torch.randn(8, 4, 8, 8, generator=generator), torch.rand(8, 4, 8, 8, generator=generator) * 0.1
    labels = torch.randint(0, 2, (8,), generator=generator)
    torch.manual_seed(0)
    losses = [train_step(step, [mean, std], labels).loss.item() for _ in range(steps)]
    return losses, step


# bf16 keeps 8 mantissa bits (per-element relative error ~4e-3); the mean loss over a batch averages
# it down. Measured: 9e-5 relative over 6 steps (fp16: 3e-6); the test allows 1e-2 relative.
BF16_LOSS_RTOL = 1e-2


def test_bf16_training_tracks_fp32_losses():
    fp32, _ = train_losses("fp32")
    bf16, run = train_losses("bf16")
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16)) < BF16_LOSS_RTOL, (fp32, bf16)
    assert fp32 != bf16  # autocast did act
    assert all(param.dtype == torch.float32 for param in run.model.parameters())


def test_fp16_scales_the_loss_and_keeps_fp32_state():
    losses, run = train_losses("fp16", steps=2)
    assert run.scaler.is_enabled() and run.scaler.get_scale() > 1
    assert all(param.dtype == torch.float32 for param in [*run.model.parameters(), *run.ema.parameters()])
    states = [value for state in run.opt.state.values() for value in state.values() if value.is_floating_point()]
    assert states and all(value.dtype == torch.float32 for value in states)
    fp32, _ = train_losses("fp32", steps=2)
    assert abs(losses[0] - fp32[0]) / fp32[0] < BF16_LOSS_RTOL


#################################################################################
#                                Precision flags                                #
#################################################################################

def test_train_precision_default_and_choices(capsys):
    args, _ = train.parse_args(["--data-path", "x"])
    assert (args.precision, args.compile, args.grad_checkpointing, args.max_grad_norm) == ("tf32", False, False, None)
    assert set(PRECISIONS) == {"fp32", "tf32", "bf16", "fp16"}
    for argv, message in ((["--data-path", "x", "--feature-path", "y"], "not allowed with argument --data-path"),
                          (["--model", "SiT-S/2"], "one of the arguments --data-path --feature-path is required")):
        with pytest.raises(SystemExit) as error:
            train.parse_args(argv)
        assert error.value.code == 2 and message in capsys.readouterr().err


#################################################################################
#                          CPU threads per process                              #
#################################################################################

def test_cpu_threads_follow_omp_num_threads_else_share_the_cores():
    from sit.speed import cpu_thread_choice

    assert cpu_thread_choice({"OMP_NUM_THREADS": "3"}, cores=8, local_processes=4) == (3, "OMP_NUM_THREADS=3")
    assert cpu_thread_choice({}, cores=8, local_processes=2) == (4, "8 cores / 2 processes; set OMP_NUM_THREADS to choose")
    assert cpu_thread_choice({}, cores=2, local_processes=1) == (2, "2 cores / 1 process; set OMP_NUM_THREADS to choose")
    assert cpu_thread_choice({}, cores=2, local_processes=4)[0] == 1  # never 0
    for unusable in ("", "0", "two"):
        assert cpu_thread_choice({"OMP_NUM_THREADS": unusable}, cores=6, local_processes=3)[0] == 2


def test_configure_cpu_threads_sets_torch_and_says_so_only_on_a_cpu(monkeypatch):
    import sit.speed as speed

    before = torch.get_num_threads()
    monkeypatch.setattr(speed, "available_cores", lambda: 4)
    monkeypatch.setattr(speed.os, "getloadavg", lambda: (9.5, 0.0, 0.0))
    try:
        message = speed.configure_cpu_threads(torch.device("cpu"), {"LOCAL_WORLD_SIZE": "2"})
        assert torch.get_num_threads() == 2
        assert message == ("CPU threads: 2 per process (4 cores / 2 processes; set OMP_NUM_THREADS to choose); the "
                           "machine is busy (load 9.5 on 4 cores): if steps are slow, try OMP_NUM_THREADS=1")
        message = speed.configure_cpu_threads(torch.device("cpu"), {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"})
        assert torch.get_num_threads() == 1 and message == "CPU threads: 1 per process (OMP_NUM_THREADS=1)"
        assert speed.configure_cpu_threads(torch.device("cuda", 0), {}) is None
        assert torch.get_num_threads() == 1  # a GPU process keeps its threads
    finally:
        torch.set_num_threads(before)


#################################################################################
#               --precision auto: the hardware's bf16 matrix units              #
#################################################################################

AMX_CPU = frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"})
AVX512_BF16_CPU = frozenset({"avx512f", "avx512_bf16"})
PLAIN_CPU = frozenset({"avx2", "fma"})


def test_auto_precision_for_each_kind_of_hardware():
    from sit.speed import bf16_matrix_units, resolve_precision_choice

    assert [bf16_matrix_units(flags) for flags in (AMX_CPU, AVX512_BF16_CPU, PLAIN_CPU)] == ["AMX", "AVX512-BF16", None]
    assert bf16_matrix_units(frozenset({"amx_tile", "amx_int8"})) is None  # AMX without its bf16 part
    assert [resolve_precision_choice("auto", "cpu", flags) for flags in (AMX_CPU, AVX512_BF16_CPU, PLAIN_CPU)] == \
        ["bf16", "bf16", "fp32"]
    # GPUs: the host CPU is moot
    assert {resolve_precision_choice("auto", "cuda", flags) for flags in (AMX_CPU, PLAIN_CPU)} == {"tf32"}
    for given in PRECISIONS:  # anything but auto is kept as given, whatever the hardware
        assert resolve_precision_choice(given, "cpu", AMX_CPU) == given == resolve_precision_choice(given, "cuda", PLAIN_CPU)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from sit.speed import cpu_flags

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512_bf16 amx_tile amx_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(cpuinfo)) == {"fpu", "avx512_bf16", "amx_tile", "amx_bf16"}  # the first processor's
    assert cpu_flags(str(tmp_path / "absent")) == frozenset()  # not Linux: no units known, fp32


def test_the_log_line_says_what_was_detected_and_the_measured_advice():
    from sit.speed import matmul_speedup, precision_advice

    cpu = torch.device("cpu")
    assert precision_advice("tf32", cpu, AMX_CPU, speedup=6.04) == (
        "CPU: bf16 matrix units AMX; a bf16 matmul runs 6.0x fp32 here; bf16 matmuls are faster here: --precision "
        "bf16 (or auto) uses them")
    assert precision_advice("bf16", cpu, AVX512_BF16_CPU, speedup=2.3) == (
        "CPU: bf16 matrix units AVX512-BF16; a bf16 matmul runs 2.3x fp32 here; bf16 matmuls are faster here")
    assert precision_advice("bf16", cpu, PLAIN_CPU, speedup=0.4) == (
        "CPU: no bf16 matrix units (AMX / AVX512-BF16); a bf16 matmul runs 0.4x fp32 here; bf16 does not pay here: "
        "--precision fp32 is as fast and exact")
    assert precision_advice("bf16", torch.device("cuda", 0), AMX_CPU, speedup=1.0) is None
    state = torch.get_rng_state()
    assert matmul_speedup(size=64, repeats=1) > 0
    assert torch.equal(torch.get_rng_state(), state)  # measured without drawing from the run's random stream


@pytest.mark.parametrize("device, flags, expected", [("cpu", AMX_CPU, "bf16"), ("cpu", AVX512_BF16_CPU, "bf16"),
                                                     ("cpu", PLAIN_CPU, "fp32"), ("cuda", AMX_CPU, "tf32")])
def test_auto_is_resolved_before_train_and_sampling_configs_store_it(device, flags, expected, monkeypatch):
    import sample_ddp
    import sit.sampling.settings
    import sit.speed
    import sit.training.settings
    from train_configs import resolve_train_config

    monkeypatch.setattr(sit.speed, "cpu_flags", lambda: flags)
    for module in (sit.training.settings, sit.sampling.settings):
        monkeypatch.setattr(module, "default_device_type", lambda: device)
    args, explicit = train.parse_args(["--data-path", "x", "--precision", "auto"])
    config, _ = resolve_train_config(vars(args), explicit)
    assert config.optim.precision == expected and config.settings()["precision"] == expected  # what checkpoints store
    args, explicit = train.parse_args(["--data-path", "x"])
    assert resolve_train_config(vars(args), explicit)[0].optim.precision == "tf32"  # the default: the original's
    _, sampling = sample_ddp.parse_args(["ODE", "--precision", "auto"])
    assert sampling.precision == expected  # its folder name and record: the precision that ran


def test_auto_contradicting_tf32_flags_is_refused():
    from sit.errors import UsageError
    from sit.sampling.settings import resolve_precision

    for tf32 in (True, False):
        with pytest.raises(UsageError, match="contradicts --precision auto"):
            resolve_precision(tf32, "auto")


@pytest.mark.slow
def test_sample_ddp_logs_its_speed_whole_and_after_the_first_batch_and_what_the_cpu_has(tmp_path, tiny_vae):
    from sit.speed import bf16_matrix_units, cpu_flags
    from test_sample import FAST_ODE, run_script, write_checkpoint

    checkpoint = str(write_checkpoint(tmp_path / "0000002.pt", tiny_vae))
    result = run_script(["sample_ddp.py", "ODE", *FAST_ODE, "--ckpt", checkpoint, "--num-fid-samples", "3",
                         "--per-proc-batch-size", "1", "--sample-dir", str(tmp_path / "samples"), "--precision", "auto"],
                        cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    speed = re.search(r"Sampled (\d+) images in ([0-9.]+) s: ([0-9.]+) img/s \(model, VAE decode and PNGs, all "
                      r"processes\); after the first batch \(warm-up, compilation\): ([0-9.]+) img/s", result.stdout)
    assert speed is not None, result.stdout
    count, seconds, rate = int(speed[1]), float(speed[2]), float(speed[3])
    assert count == 3 and count / rate == pytest.approx(seconds, abs=0.051)  # seconds: rounded to 0.1 in the line
    units = bf16_matrix_units(cpu_flags())
    assert (f"CPU: bf16 matrix units {units};" if units else "CPU: no bf16 matrix units") in result.stdout
    (folder,) = [name for name in os.listdir(tmp_path / "samples") if not name.endswith((".npz", ".json"))]
    assert f"prec-{'bf16' if units else 'fp32'}" in folder  # auto, resolved, names the folder


def test_fused_ema_equals_the_originals_per_parameter_update_bitwise():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from bench import original_update_ema
    from sit.training.optimizer import update_ema

    model = tiny_sit(depth=2)
    ours, original = deepcopy(model).requires_grad_(False), deepcopy(model).requires_grad_(False)
    for step in range(3):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param), alpha=0.1)
        update_ema(ours, model, decay=0.9999)
        original_update_ema(original, model, decay=0.9999)
        for (name, mine), theirs in zip(ours.named_parameters(), original.parameters()):
            assert torch.equal(mine, theirs), (step, name)
