"""Post-hoc EMA while training (Karras et al. 2024, Sec. 3 and App. C; edm2's training/phema.py):
power-function EMAs of the weights, tracked every step and saved every --phema-every steps as snapshots
from which reconstruct_ema.py (sit.training.reconstruction) builds an EMA of any length.

A power-function EMA of exponent gamma has the profile p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on
(0, t]; beta_t = (1 - 1/t)^(gamma + 1) per step tracks it exactly. Its length is the relative std
sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (--phema-stds).
Snapshot <experiment>/phema/<step>.pt (step 0: the initial weights): format "sit-phema-snapshot", version,
step, stds, emas (one fp32 state dict per std), model_config, args (the run's settings), run_id (absent in
snapshots of earlier versions).
"""
from __future__ import annotations

import argparse
import math
import os
import secrets
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch

from sit.cli import positive_int
from sit.config import FREE, Rule, Setting
from sit.declarations import Needs, declare
from sit.errors import UsageError
from sit.files import atomic_torch_save
from sit.training.extensions import ExtensionContext, Feature, LoopExtension

SNAPSHOT_FORMAT = "sit-phema-snapshot"
SNAPSHOT_VERSION = 1
SNAPSHOT_FOLDER = "phema"
MAX_STD = math.sqrt(1 / 12)  # sigma_rel of gamma = 0 (a flat average); longer profiles need gamma < 0
DEFAULT_PHEMA_EVERY = 10_000


def std_to_exponent(std: float) -> float:
    """The exponent gamma >= 0 whose profile has relative standard deviation std, 0 < std < sqrt(1/12).

    sigma^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) is the cubic
    gamma^3 + 7 gamma^2 + (16 - sigma^-2) gamma + (12 - sigma^-2) = 0; its largest real root.
    """
    if not 0.0 < std < MAX_STD:
        raise ValueError(f"a relative standard deviation must lie in (0, {MAX_STD:.4f}), got {std}")
    inverse_square = std ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inverse_square, 12.0 - inverse_square])
    return float(max(root.real for root in roots if abs(root.imag) < 1e-9))


def std_list(value: str) -> tuple[float, ...]:
    """argparse type of --phema-stds: comma-separated relative standard deviations in (0, 0.2887)."""
    try:
        stds = tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.050,0.100, got {value!r}")
    if not stds or not all(0.0 < std < MAX_STD for std in stds) or len(set(stds)) != len(stds):
        raise argparse.ArgumentTypeError(f"expected distinct relative standard deviations in (0, {MAX_STD:.4f}) "
                                         f"such as 0.050,0.100, got {value!r}")
    return stds


PHEMA_CONFLICT = ("{flag} {given} but {source} tracked {flag} {held}; post-hoc EMAs follow a run from step 0: "
                  "drop the flag or start a new experiment")


@dataclass(frozen=True)
class PhemaSettings:
    """--phema-stds (None: off) and --phema-every."""
    TITLE: ClassVar[str] = "post-hoc EMA (Karras et al. 2024; reconstruct_ema.py)"
    DDP_ONLY: ClassVar[tuple[str, str]] = ("--phema-stds", "its EMAs hold whole tensors")
    # post-hoc EMAs follow a run from step 0: the stds are the checkpoint's; the snapshot interval too unless given
    phema_stds: Optional[tuple[float, ...]] = declare(
        None, "track power-function EMAs of these relative standard deviations, e.g. 0.050,0.100, and save their "
              "snapshots to <experiment>/phema/<step>.pt (default: off)", type=std_list,
        resume=Setting(Rule.LOCKED, conflict=PHEMA_CONFLICT, same=lambda given, held: tuple(given or ()) == tuple(held or ())))
    phema_every: int = declare(DEFAULT_PHEMA_EVERY, "steps between post-hoc EMA snapshots (and one at the end of the run)",
                               type=positive_int, resume=FREE,
                               needs=Needs("--phema-stds", lambda settings: settings.phema_stds is not None))

    def __post_init__(self):
        if self.phema_stds is not None:  # a checkpoint holds a list
            object.__setattr__(self, "phema_stds", tuple(self.phema_stds))

    @property
    def enabled(self) -> bool:
        return self.phema_stds is not None

    def folder_tag(self) -> Optional[str]:
        """The experiment folder's mark: phema."""
        return "phema" if self.enabled else None

    def check_start(self, resumed: Optional[dict]) -> None:
        """UsageError when --phema-stds would start in the middle of a run (resumed: the checkpoint, or None)."""
        if self.enabled and resumed is not None and resumed.get("train_steps", 0) > 0 and not resumed.get("phema"):
            raise UsageError(f"--phema-stds: the checkpoint at step {resumed['train_steps']} holds no post-hoc EMAs, "
                             f"and they follow a run from step 0: start a new experiment (or fine-tune its weights "
                             f"with --ckpt)")


class PowerEMATracker:
    """Power-function EMAs of a model's parameters (on its device), one per std, updated every step."""

    def __init__(self, model: torch.nn.Module, stds: Sequence[float], state: Optional[dict] = None):
        """state: a `state_dict()` to continue from (a resumed run, with its run id); else the EMAs start as
        the weights (step 1 replaces them entirely: its beta is 0) under a new run id."""
        self.stds = tuple(float(std) for std in stds)
        # the run's identity in its snapshots (secrets: the training RNG streams stay untouched); an earlier
        # version's state has none, and its snapshots go on without one
        self.run_id: Optional[str] = state.get("run_id") if state is not None else secrets.token_hex(8)
        self.exponents = [std_to_exponent(std) for std in self.stds]
        self.names = [name for name, _ in model.named_parameters()]
        params = dict(model.named_parameters())
        if state is not None and tuple(state["stds"]) != self.stds:
            raise ValueError(f"the post-hoc EMA state tracks stds {tuple(state['stds'])}, not {self.stds}")
        self.averages = [
            [(stored[name] if state is not None else params[name]).detach().to(params[name].device, copy=True)
             for name in self.names]
            for stored in (state["emas"] if state is not None else [None] * len(self.stds))
        ]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based, counted from the run's start)."""
        params = dict(model.named_parameters())
        current = [params[name].detach() for name in self.names]
        for gamma, averages in zip(self.exponents, self.averages):
            torch._foreach_lerp_(averages, current, 1.0 - (1.0 - 1.0 / step) ** (gamma + 1.0))  # 1 - beta_t

    def state_dict(self) -> dict:
        """{"stds": [...], "emas": [{name: tensor}, ...], "run_id"}: what a train checkpoint keeps (references)."""
        state = {"stds": list(self.stds), "emas": [dict(zip(self.names, averages)) for averages in self.averages]}
        return state if self.run_id is None else dict(state, run_id=self.run_id)

    def ema_state_dicts(self, model: torch.nn.Module) -> list[dict]:
        """One full state dict per std (the model's buffers, these EMAs' parameters), fp32 on the CPU."""
        full = []
        for averages in self.averages:
            state = {**model.state_dict(), **dict(zip(self.names, averages))}
            full.append({name: tensor.detach().float().cpu().clone() for name, tensor in state.items()})
        return full


def snapshot_path(experiment_dir: str, step: int) -> str:
    return os.path.join(experiment_dir, SNAPSHOT_FOLDER, f"{step:07d}.pt")


def write_snapshot(path: str, step: int, tracker: PowerEMATracker, model: torch.nn.Module,
                   settings: dict[str, Any]) -> None:
    """Save the tracked EMAs after `step` to path atomically (see the module docstring for the keys)."""
    identity = {} if tracker.run_id is None else {"run_id": tracker.run_id}
    atomic_torch_save({"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "step": step,
                       "stds": list(tracker.stds), "emas": tracker.ema_state_dicts(model),
                       "model_config": dict(model.config), "args": dict(settings), **identity}, path)


class PhemaSnapshots(LoopExtension):
    """The loop extension: fold the weights into the EMAs after every step, write a snapshot at step 0
    (the initial weights: a traditional EMA keeps a share of them), every --phema-every steps and at the end."""
    name = "phema"

    def __init__(self, settings: PhemaSettings, model: torch.nn.Module, state: Optional[dict]):
        self.settings = settings
        self.tracker = PowerEMATracker(model, settings.phema_stds, state or None)
        self.last_step: Optional[int] = None  # the step of the last snapshot written by this process

    def state_dict(self) -> dict:
        return self.tracker.state_dict()

    def restore(self, run: Any, state: dict) -> None:
        self.tracker = PowerEMATracker(run.step.model, self.settings.phema_stds, state or None)

    def start(self, run: Any) -> None:
        if run.state.train_steps == 0:
            self.save(run)
        else:
            self.last_step = run.state.train_steps  # a resumed run wrote this step's snapshot before

    def after_step(self, run: Any) -> None:
        self.tracker.update(run.step.model, run.state.train_steps)

    def before_checkpoint(self, run: Any) -> None:
        if run.state.train_steps % self.settings.phema_every == 0:
            self.save(run)

    def end(self, run: Any) -> None:
        if run.state.train_steps > 0 and self.last_step != run.state.train_steps:
            self.save(run)

    def save(self, run: Any) -> None:
        """Check health, then rank 0 writes the EMAs to phema/<step>.pt atomically (all ranks call this)."""
        step = run.state.train_steps
        run.check_health()
        path = snapshot_path(run.experiment_dir, step) if run.ctx.is_main else None

        def write() -> None:
            write_snapshot(path, step, self.tracker, run.step.model, run.config.settings())
            run.logger.info(f"Saved post-hoc EMA snapshot to {path}")

        run.write_on_main("post-hoc EMA snapshot", path, write)
        self.last_step = step


def setup_snapshots(settings: PhemaSettings, context: ExtensionContext) -> Optional[PhemaSnapshots]:
    """The run's snapshots (None without --phema-stds), continuing a resumed checkpoint's EMAs."""
    return PhemaSnapshots(settings, context.model, context.saved) if settings.enabled else None


FEATURE = Feature("phema", PhemaSettings, extension=setup_snapshots)
