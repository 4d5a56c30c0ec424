"""The recipe "Add a sampler" (docs/ARCHITECTURE.md), followed from this file alone: a toy family, a
fixed-step Euler ODE with its own flag, registered in SAMPLER_FAMILIES, runs through sample.py and
sample_ddp.py, names itself in the folder and the record, and gives the samples computed by hand."""
import argparse
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sample_ddp
import sit.generation
from sit.config import SamplerFamily
from sit.errors import UsageError
from sit.generation import guided_sample
from sit.sampling.families import SAMPLER_FAMILIES
from test_grid import pixel_checkpoint
from transport import Sampler, SampleFunction


def add_toy_flags(parser: argparse.ArgumentParser) -> None:
    """The toy family's flag group: one flag of its own."""
    group = parser.add_argument_group("ToyEuler arguments")
    group.add_argument("--end-time", type=float, default=1.0, help="integrate from t=0 to this t")


@dataclass(frozen=True)
class ToyEulerConfig(SamplerFamily):
    """Fixed-step Euler on the probability-flow ODE from t=0 to end_time."""
    sampling_method: str = "toy-euler"
    num_steps: int = 250
    end_time: float = 1.0
    time_shift: Optional[float] = None

    mode = "ToyEuler"
    title = "ToyEuler (a test's Euler ODE)"
    add_flags = staticmethod(add_toy_flags)

    def describe(self) -> str:
        return f"ToyEuler, {self.num_steps} steps to t={self.end_time}"

    def sample_fn(self, sampler: Sampler, keep_trajectory: bool = False) -> Callable:
        def run(x, model, **model_kwargs):
            return [euler(sampler.drift, x, model, self.num_steps, self.end_time, **model_kwargs)]
        return SampleFunction(run)


def euler(drift: Callable, x: torch.Tensor, model: Callable, num_steps: int, end_time: float,
          **model_kwargs) -> torch.Tensor:
    """x + dt * drift at each of the grid's num_steps - 1 steps; x: (N, C, H, W)."""
    grid = torch.linspace(0.0, end_time, num_steps)
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * drift(x, torch.full((len(x),), float(t)), model, **model_kwargs)
    return x


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(SAMPLER_FAMILIES, ToyEulerConfig.mode, ToyEulerConfig)


@pytest.fixture
def recorded(monkeypatch) -> list:
    """Each guided_sample call of the run: its model, noise, labels, guidance and samples."""
    calls = []

    def recording(sample_fn, model, z, y, guidance, always_guide=False):
        samples = guided_sample(sample_fn, model, z, y, guidance, always_guide)
        calls.append(dict(model=model, z=z.clone(), y=y.clone(), guidance=guidance, samples=samples))
        return samples

    monkeypatch.setattr(sit.generation, "guided_sample", recording)
    return calls


def test_the_toy_family_is_a_mode_with_its_flag_and_describes_itself(toy_family):
    args, config = sample.parse_args(["ToyEuler", "--end-time", "0.5", "--num-sampling-steps", "3"])
    assert config.sampler == ToyEulerConfig(num_steps=3, end_time=0.5)
    assert config.sampler.describe() == "ToyEuler, 3 steps to t=0.5"
    assert config.sampler.evaluations(2) == "toy-euler, 3 steps: 2 model evaluations"
    with pytest.raises(SystemExit):
        sample.parse_args(["ODE", "--end-time", "0.5"])  # another family's flag
    with pytest.raises(UsageError, match="--likelihood works in ODE mode only"):
        sample_ddp.parse_args(["ToyEuler", "--likelihood"])  # no likelihood_fn: refused, as SDE's


def test_sample_py_runs_the_toy_family_and_gives_the_samples_by_hand(toy_family, recorded, tmp_path):
    ckpt = pixel_checkpoint(tmp_path / "pixel.pt")
    sample.main(["ToyEuler", "--ckpt", ckpt, "--end-time", "0.9", "--num-sampling-steps", "4", "--class-labels",
                 "1,2", "--cfg-scale", "2", "--output", str(tmp_path / "grid.png")])
    (call,) = recorded
    model, z, y = call["model"], call["z"], call["y"]
    drift = Sampler(sample_ddp_transport()).drift
    doubled = euler(drift, torch.cat([z, z]), model.forward_with_cfg, 4, 0.9, y=torch.cat([y, torch.full_like(y, 10)]),
                    cfg_scale=2.0, guide_all_channels=False, cfg_interval=(0.0, 1.0))  # (2N, C, H, W)
    assert torch.equal(call["samples"], doubled.chunk(2)[0])
    assert os.path.isfile(tmp_path / "grid.png")


def test_sample_ddp_names_the_toy_family_in_its_folder_and_record(toy_family, recorded, tmp_path):
    ckpt = pixel_checkpoint(tmp_path / "pixel.pt")
    sample_dir = tmp_path / "samples"
    sample_ddp.main(["ToyEuler", "--ckpt", ckpt, "--end-time", "0.9", "--num-sampling-steps", "4",
                     "--num-fid-samples", "3", "--per-proc-batch-size", "2", "--sample-dir", str(sample_dir)])
    (folder,) = [path for path in sample_dir.iterdir() if path.is_dir()]
    assert "-ToyEuler-toy-euler-steps-4-" in folder.name and folder.name.endswith("-bs-2-end_time-0.9")
    record = json.loads((sample_dir / f"{folder.name}.json").read_text())
    assert (record["mode"], record["sampling_method"], record["num_sampling_steps"]) == ("ToyEuler", "toy-euler", 4)
    assert record["sampler_settings"]["end_time"] == 0.9
    drift = Sampler(sample_ddp_transport()).drift
    images = []
    for call in recorded:  # per block, unguided at --cfg-scale 1
        by_hand = euler(drift, call["z"], call["model"].forward, 4, 0.9, y=call["y"])
        assert torch.equal(call["samples"], by_hand)
        images.append(by_hand)
    pixels = torch.clamp(127.5 * torch.cat(images).clamp(-1, 1) + 128.0, 0, 255).permute(0, 2, 3, 1)  # (N, H, W, 3)
    saved = np.stack([np.asarray(Image.open(folder / f"{index:06d}.png")) for index in range(3)])
    np.testing.assert_array_equal(saved, pixels.to(torch.uint8).numpy())


def sample_ddp_transport():
    """The checkpoint's transport: Linear, velocity (tests/test_grid.py's pixel_checkpoint)."""
    from transport import create_transport

    return create_transport("Linear", "velocity")
