"""MeanFlow (Geng et al. 2025): the model learns the average velocity u(z_t, t, r) over [t, r], so that one
or two evaluations sample an image. In SiT's times, u = v - (t - r) d/dt u, the target one torch.func.jvp
of the SiT with tangent (v, 0, 1) under stop-gradient (docs/meanflow.md); labels are dropped once per step,
the same for the JVP and the trained forward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from sit.cli import positive_float, unit_interval_float
from sit.config import LOCKED, RUN_CHANGE
from sit.declarations import Needs, declare
from sit.errors import UsageError
from sit.training.extensions import Feature
from sit.training.terms import Objective

FLOW, MEANFLOW = "flow", "meanflow"
ADAPTIVE_C = 1e-3  # the paper's c of the adaptive weight
MSE = "MeanFlow MSE"  # the unweighted mean squared error, logged beside the weighted loss
MEAN_FLOW = Needs("--objective meanflow", lambda settings: settings.objective == MEANFLOW)


@dataclass(frozen=True)
class MeanFlowSettings:
    """--objective and MeanFlow's flags (defaults: the paper's ImageNet settings)."""
    TITLE: ClassVar[str] = "training objective (MeanFlow: sit/training/meanflow.py; docs/meanflow.md)"
    DDP_ONLY: ClassVar[tuple[str, str]] = (
        "--objective meanflow", "its torch.func.jvp through FSDP2's sharded parameters is untested")
    objective: str = declare(FLOW, "flow: the transport's loss (the original's); meanflow: MeanFlow's average "
                                   "velocity for 1- and 2-step sampling", choices=(FLOW, MEANFLOW), resume=LOCKED)
    meanflow_ratio: float = declare(0.25, "fraction of samples with r != t", type=unit_interval_float,
                                    resume=RUN_CHANGE, needs=MEAN_FLOW)
    meanflow_time_mean: float = declare(-0.4, "mean of the logit-normal of t and r (MeanFlow's tau = 1 - t)",
                                        type=float, resume=RUN_CHANGE, needs=MEAN_FLOW)
    meanflow_time_std: float = declare(1.0, "std of that logit-normal", type=positive_float, resume=RUN_CHANGE,
                                       needs=MEAN_FLOW)
    meanflow_adaptive_p: float = declare(1.0, "power p of the adaptive weight 1 / (||err||^2 + 1e-3)^p (0: plain "
                                              "squared error)", type=float, resume=RUN_CHANGE, needs=MEAN_FLOW)
    meanflow_omega: float = declare(1.0, "guidance folded into training: weight of the true velocity (1: none)",
                                    type=positive_float, resume=RUN_CHANGE, needs=MEAN_FLOW)
    meanflow_kappa: float = declare(0.0, "guidance folded into training: weight of the conditional prediction, "
                                         "in [0, 1)", type=float, resume=RUN_CHANGE, needs=MEAN_FLOW)

    @property
    def enabled(self) -> bool:
        return self.objective == MEANFLOW

    @property
    def guided(self) -> bool:
        return self.meanflow_omega != 1.0 or self.meanflow_kappa != 0.0

    def folder_tag(self) -> Optional[str]:
        return "meanflow" if self.enabled else None

    def model_options(self) -> dict:
        """The SiT arguments the objective needs: the second time input."""
        return {"mean_flow": True} if self.enabled else {}

    def check(self, config: Any) -> None:
        """UsageError (one line naming the flag) for settings MeanFlow cannot train with."""
        if not self.enabled:
            return
        if not 0.0 <= self.meanflow_kappa < 1.0:
            raise UsageError(f"--meanflow-kappa must be in [0, 1), got {self.meanflow_kappa}")
        if self.meanflow_adaptive_p < 0:
            raise UsageError(f"--meanflow-adaptive-p must be >= 0, got {self.meanflow_adaptive_p}")
        if config.transport.prediction != "velocity":
            raise UsageError(f"--objective meanflow learns an average velocity: use --prediction velocity, not "
                             f"{config.transport.prediction}")
        if config.time.schedule() is not None:
            raise UsageError("--time-sampling/--time-shift place the flow objective's t; --objective meanflow draws t "
                             "and r by --meanflow-time-mean/--meanflow-time-std: drop them")
        if getattr(config.features.get("repa"), "enabled", False):
            raise UsageError("--objective meanflow replaces the transport's loss; loss terms (--repa-encoder) do not "
                             "combine with it yet: drop one")
        kwargs = {**config.model.sit_kwargs(), **self.model_options()}
        if self.guided and kwargs.get("class_dropout_prob", 0.1) <= 0:
            raise UsageError("--meanflow-omega/--meanflow-kappa guide with the null class, but class_dropout_prob is "
                             "0: drop them or train with label dropout")

    def check_start(self, resumed: Optional[dict]) -> None:
        """UsageError when --objective meanflow would resume a velocity model's train checkpoint (it has no r
        input: the run would ignore r); its weights alone fine-tune (build_model starts the r-embedder at zero)."""
        if self.enabled and resumed is not None and not resumed.get("model_config", {}).get("mean_flow", False):
            raise UsageError("--objective meanflow: the checkpoint is a velocity model's train checkpoint, which resumes "
                             "as it was; to fine-tune it, pass its weights alone as --ckpt (e.g. torch.save(torch.load"
                             "(ckpt)[\"ema\"], \"weights.pt\"))")


def draw_times(settings: MeanFlowSettings, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r), each (N,), in SiT's convention, r >= t: two logit-normal draws in MeanFlow's tau, sorted
    (tau > rho), r = t for all but --meanflow-ratio of the samples, then t = 1 - tau, r = 1 - rho."""
    normal = torch.randn(n, 2) * settings.meanflow_time_std + settings.meanflow_time_mean  # (N, 2)
    tau, rho = torch.sigmoid(normal).sort(dim=1, descending=True).values.unbind(1)
    rho = torch.where(torch.rand(n) < settings.meanflow_ratio, rho, tau)
    return (1 - tau).to(device), (1 - rho).to(device)


class MeanFlowObjective(Objective):
    """MeanFlow's loss (see the module docstring) as the step's primary objective."""
    name = MEANFLOW

    def __init__(self, settings: MeanFlowSettings):
        self.settings = settings

    def losses(self, step: Any, latents: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        settings, sit = self.settings, step.model
        n, device = len(latents), latents.device
        t, r = draw_times(settings, n, device)
        noise = torch.randn_like(latents)
        t, x_t, v = step.transport.path_sampler.plan(t, noise, latents)  # x_t, v: (N, C, H, W)
        null = torch.full_like(labels, sit.num_classes)
        dropped = torch.rand(n, device=device) < sit.config["class_dropout_prob"]  # (N,)
        y = torch.where(dropped, null, labels)
        expand = (n,) + (1,) * (latents.ndim - 1)
        if settings.guided:
            with torch.no_grad():  # v~ = omega v + kappa u(.|c) + (1 - omega - kappa) u(.|null), kept labels only
                conditional, unconditional = sit(x_t, t, labels, r=t), sit(x_t, t, null, r=t)
            omega, kappa = settings.meanflow_omega, settings.meanflow_kappa
            guided = omega * v + kappa * conditional + (1 - omega - kappa) * unconditional
            v = torch.where(dropped.view(expand), v, guided.to(v.dtype))
        with torch.no_grad():  # d/dt u along (v, 0, 1), under stop-gradient
            _, dudt = torch.func.jvp(lambda x, rr, tt: sit(x, tt, y, r=rr), (x_t, r, t),
                                     (v, torch.zeros_like(r), torch.ones_like(t)))
        target = v - (t - r).view(expand) * dudt
        error = (step.ddp_model(x_t, t, y, r=r) - target).float().flatten(1)  # (N, D)
        squared = error.pow(2).sum(dim=1)                                      # (N,)
        weight = 1.0 / (squared.detach() + ADAPTIVE_C).pow(settings.meanflow_adaptive_p)
        return weight * squared, {MSE: error.detach().pow(2).mean(dim=1)}


def setup_meanflow(settings: MeanFlowSettings) -> Optional[MeanFlowObjective]:
    """The run's objective: MeanFlow's with --objective meanflow, else None (the transport's loss)."""
    return MeanFlowObjective(settings) if settings.enabled else None


FEATURE = Feature("meanflow", MeanFlowSettings, objective=setup_meanflow)
