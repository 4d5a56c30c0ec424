"""Post-hoc EMA reconstruction (Karras et al. 2024, App. C.3; edm2's reconstruct_phema.py): an EMA of any
length as the least-squares weighted sum of the power-function EMA snapshots (sit.training.phema).

Each snapshot and the target are profiles over time; the weights x solve A x = b with A_ij = <p_i, p_j>
and b_i = <p_i, target> (closed forms; a 1-D integral for a traditional EMA, r(tau) = lambda
e^(-lambda (T - tau))), then sum to 1 as in edm2. A traditional EMA also gives the initial weights the
share beta^T, which comes from the step-0 snapshot (else reported missing). `residual`: the fitted
profile's relative L2 distance from the target's.
"""
from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from scipy.integrate import quad

from sit.checkpoint import non_finite_tensor
from sit.errors import UsageError
from sit.files import atomic_torch_save, step_files
from sit.training.phema import SNAPSHOT_FOLDER, SNAPSHOT_FORMAT, std_to_exponent


@dataclass(frozen=True)
class EMATarget:
    """An EMA to reconstruct: the power-function profile of relative std `std`, or (std None) the
    traditional EMA of constant `decay` per step started at the initial weights (train.py's --ema-decay)."""
    std: Optional[float] = None
    decay: Optional[float] = None

    @property
    def name(self) -> str:
        """How output files are named: "std-0.150" or "decay-0.9999"."""
        return f"std-{self.std:.3f}" if self.std is not None else f"decay-{self.decay}"

    def inner_products(self, steps: np.ndarray, exponents: np.ndarray, at_step: int) -> np.ndarray:
        """<p_i, target> for snapshots of exponents g_i taken at steps t_i <= at_step; shapes (n,)."""
        if self.std is not None:
            return power_inner_products(steps, exponents, np.float64(at_step), np.float64(std_to_exponent(self.std)))
        return np.array([decay_inner_product(step, gamma, at_step, self.decay) for step, gamma in zip(steps, exponents)])

    def squared_norm(self, at_step: int) -> float:
        """<target, target> over (0, at_step]."""
        if self.std is not None:
            gamma = std_to_exponent(self.std)
            return (gamma + 1) ** 2 / ((2 * gamma + 1) * at_step)
        rate = -math.log(self.decay)
        return rate / 2 * -math.expm1(-2 * rate * at_step)

    def initial_share(self, at_step: int) -> float:
        """The weight the target gives the initial weights (decay^T for a traditional EMA; 0 otherwise)."""
        return 0.0 if self.std is not None else self.decay ** at_step


def power_inner_products(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> of power-function profiles (broadcast): with t_a <= t_b,
    (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) t_b) * (t_a / t_b)^g_b, and symmetrically."""
    t_a, g_a, t_b, g_b = np.broadcast_arrays(*(np.asarray(value, dtype=np.float64) for value in (t_a, g_a, t_b, g_b)))
    later_exponent = np.where(t_a <= t_b, g_b, g_a)
    ratio = np.minimum(t_a, t_b) / np.maximum(t_a, t_b)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * np.maximum(t_a, t_b)) * ratio ** later_exponent


def decay_inner_product(step: float, gamma: float, at_step: float, decay: float) -> float:
    """<p, r> of the power profile (gamma, step) and the traditional EMA r = lambda e^(-lambda (T - tau)):
    lambda e^(-lambda (T - step)) times the integral over v in [0, 1] of
    exp(-lambda step (1 - v^(1 / (gamma + 1))))."""
    rate = -math.log(decay)
    scale = rate * step
    integral, _ = quad(lambda v: math.exp(-scale * (1.0 - v ** (1.0 / (gamma + 1.0)))), 0.0, 1.0,
                       epsabs=0.0, epsrel=1e-12, limit=200)
    return rate * math.exp(-rate * (at_step - step)) * integral


def solve_coefficients(steps: Sequence[int], stds: Sequence[float], target: EMATarget,
                       at_step: int) -> tuple[np.ndarray, float]:
    """The weights x (n,) of snapshots (steps[i], stds[i]) whose sum best matches `target` at at_step
    (scaled to sum to 1), and the relative L2 distance between the fitted and the target profile."""
    step_array = np.asarray(steps, dtype=np.float64)
    exponents = np.array([std_to_exponent(std) for std in stds])
    gram = power_inner_products(step_array[:, None], exponents[:, None], step_array[None, :], exponents[None, :])  # (n, n)
    # the target's profile over (0, at_step], scaled to total weight 1 as the sum of snapshots will be
    mass = 1.0 - target.initial_share(at_step)
    projections = target.inner_products(step_array, exponents, at_step) / mass  # (n,)
    weights = np.linalg.lstsq(gram, projections, rcond=None)[0]
    weights = weights / weights.sum()
    target_norm = target.squared_norm(at_step) / mass ** 2
    distance = target_norm - 2 * weights @ projections + weights @ gram @ weights
    return weights, math.sqrt(max(distance, 0.0) / target_norm)


@dataclass
class Reconstruction:
    """A planned reconstruction: which snapshot (file, std index) gets which weight; `missing_share`:
    the share of the initial weights the target wants but no snapshot holds (0 with a step-0 snapshot)."""
    target: EMATarget
    step: int
    files: list[str]
    terms: list[tuple[int, int, float]] = field(default_factory=list)  # (file index, std index, weight)
    residual: float = 0.0
    missing_share: float = 0.0


def read_snapshot(path: str) -> dict:
    """A snapshot file, memory-mapped (its tensors are read when used); UsageError if it is not one (a
    FIFO or device is refused before it is opened: reading one would wait forever)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UsageError(f"the post-hoc EMA snapshot {path} is not a regular file; remove it from the folder")
        snapshot = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except UsageError:
        raise
    except Exception as error:  # truncated or foreign files: one line naming the file
        raise UsageError(f"cannot read the post-hoc EMA snapshot {path} ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(snapshot, dict) or snapshot.get("format") != SNAPSHOT_FORMAT:
        raise UsageError(f"{path} is not a post-hoc EMA snapshot of train.py --phema-stds")
    return snapshot


def identity(snapshot: dict) -> tuple:
    """What every snapshot of one run shares: its id, stds, model config and EMA parameter shapes."""
    shapes = [{name: tuple(tensor.shape) for name, tensor in ema.items()} for ema in snapshot.get("emas", [])]
    return snapshot.get("run_id"), list(snapshot.get("stds", [])), snapshot.get("model_config"), shapes


def check_same_run(paths: Sequence[str], newest: str) -> None:
    """UsageError naming the first snapshot that is not of the newest one's run (another run's id, stds,
    model or shapes): a sum of another run's EMAs is no EMA of this run."""
    reference = identity(read_snapshot(newest))
    for path in paths:
        other = identity(read_snapshot(path))
        if other != reference:
            what = ("another run's (its run id differs)" if other[0] != reference[0] else
                    "of other stds" if other[1] != reference[1] else "of another model or shape")
            raise UsageError(f"the post-hoc EMA snapshot {path} is {what} than {newest}: the snapshots of one run "
                             f"are needed; move the others out of the folder")


def snapshot_folder(path: str) -> str:
    """The snapshot folder of an experiment folder (<experiment>/phema), or path itself if it holds snapshots."""
    inner = os.path.join(path, SNAPSHOT_FOLDER)
    return inner if os.path.isdir(inner) else path


def plan_reconstruction(folder: str, target: EMATarget, at_step: Optional[int] = None,
                        flag: str = "the snapshot folder") -> Reconstruction:
    """Solve the weights of the snapshots in folder (those up to at_step; default: the newest step)."""
    found = step_files(folder)
    if not found:
        raise UsageError(f"{flag} {folder}: no post-hoc EMA snapshots (<step>.pt of train.py --phema-stds)")
    steps = [step for step, _ in found if step > 0]
    if not steps:
        raise UsageError(f"{flag} {folder}: only the snapshot of step 0 (the initial weights); an EMA needs the "
                         f"snapshots of trained steps (every --phema-every steps, and at the end of a run)")
    at_step = steps[-1] if at_step is None else at_step
    if at_step not in steps:
        raise UsageError(f"--step {at_step}: no snapshot of that step in {folder} (steps: "
                         f"{', '.join(map(str, steps))})")
    used = [(step, path) for step, path in found if 0 < step <= at_step]
    check_same_run([path for step, path in found if step <= at_step], used[-1][1])
    terms = [(file_index, std_index, step, float(std)) for file_index, (step, path) in enumerate(used)
             for std_index, std in enumerate(read_snapshot(path)["stds"])]  # one per (snapshot, std)
    steps, stds = [step for _, _, step, _ in terms], [std for *_, std in terms]
    weights, residual = solve_coefficients(steps, stds, target, at_step)
    plan = Reconstruction(target, at_step, [path for _, path in used],
                          [(file_index, std_index, float(weight)) for (file_index, std_index, _, _), weight
                           in zip(terms, weights)], residual, missing_share=target.initial_share(at_step))
    initial = [path for step, path in found if step == 0]  # train.py's snapshot of the initial weights
    if plan.missing_share > 0 and initial:
        plan.terms = [(file_index, std_index, weight * (1 - plan.missing_share))
                      for file_index, std_index, weight in plan.terms]
        plan.terms.append((len(plan.files), 0, plan.missing_share))
        plan.files.append(initial[0])
        plan.residual *= 1 - plan.missing_share  # the fitted part's error, in the whole EMA's terms
        plan.missing_share = 0.0
    return plan


def combine_snapshots(plan: Reconstruction) -> tuple[dict, dict]:
    """(the reconstructed state dict in fp32, the newest snapshot used), summing in float64 file by file."""
    total: dict[str, torch.Tensor] = {}
    newest: dict = {}
    for file_index, path in enumerate(plan.files):
        snapshot = read_snapshot(path)
        for term_file, std_index, weight in plan.terms:
            if term_file != file_index:
                continue
            bad = non_finite_tensor(snapshot["emas"][std_index])
            if bad is not None:
                raise UsageError(f"the post-hoc EMA snapshot {path} is not finite: {bad} (the run diverged before "
                                 f"it?); build from earlier steps with --step")
            for name, tensor in snapshot["emas"][std_index].items():
                if name not in total:
                    total[name] = torch.zeros(tensor.shape, dtype=torch.float64)
                total[name].add_(tensor.double(), alpha=weight)
        if snapshot["step"] >= newest.get("step", -1):
            newest = snapshot
    return {name: tensor.float() for name, tensor in total.items()}, newest


def write_reconstruction(plan: Reconstruction, path: str) -> None:
    """Write a checkpoint that sample.py (sit.checkpoint.load_model) and train.py --ckpt read as it is:
    {"ema", "model_config", "args" (the run's settings), "phema" (how it was made)}."""
    weights, newest = combine_snapshots(plan)
    steps = sorted(int(os.path.splitext(os.path.basename(file))[0]) for file in plan.files)
    atomic_torch_save({"ema": weights, "model_config": dict(newest["model_config"]), "args": dict(newest["args"]),
                       "phema": {"target": plan.target.name, "std": plan.target.std, "ema_decay": plan.target.decay,
                                 "step": plan.step, "snapshot_steps": steps, "residual": plan.residual}}, path)
