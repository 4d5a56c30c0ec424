"""Transport (training losses, drift and score from a model's output) and Sampler (ODE, SDE,
likelihood), with the original SiT's API and random-number order."""
from __future__ import annotations

import enum
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import torch as th

from . import path
from .arguments import check_choice, check_flag, check_integer, check_real
from .integrators import ODE_METHODS, SDE_METHODS, ODESolver, SDESolver, is_adaptive
from .schedules import TimeSchedule, shifted_unit_grid
from .utils import mean_flat

# Where a score diverges at the interval's end and the user gave no sample_eps, the SDE starts
# this far inside it (the original's default sample_eps for score and noise models).
DEFAULT_SAMPLE_EPS = 1e-3
# A coefficient this small counts as zero: GVP's sigma_1 = cos(pi / 2) is 6e-17 in float64, not 0.
VANISHING = 1e-12


class ModelType(enum.Enum):
    """Which quantity the model predicts."""
    NOISE = enum.auto()     # the noise x0 (epsilon)
    SCORE = enum.auto()     # grad log p_t(x)
    VELOCITY = enum.auto()  # dx_t/dt


class PathType(enum.Enum):
    """Which interpolant to use."""
    LINEAR = enum.auto()
    GVP = enum.auto()
    VP = enum.auto()


class WeightType(enum.Enum):
    """How score and noise losses are weighted over time."""
    NONE = enum.auto()
    VELOCITY = enum.auto()
    LIKELIHOOD = enum.auto()


PATH_PLANS = {PathType.LINEAR: path.ICPlan, PathType.GVP: path.GVPCPlan, PathType.VP: path.VPCPlan}


class Transport:
    """An interpolant plus what the model predicts: training losses and the sampling drift."""

    def __init__(self, *, model_type: ModelType, path_type: PathType, loss_type: WeightType,
                 train_eps: float, sample_eps: float, sample_eps_is_default: bool = False,
                 time_schedule: Optional[TimeSchedule] = None):
        """time_schedule: how training draws t (None: uniform, the original's torch.rand)."""
        self.time_schedule, self.loss_type, self.model_type, self.path_type = time_schedule, loss_type, model_type, path_type
        self.path_sampler = PATH_PLANS[path_type]()
        self.train_eps, self.sample_eps, self.sample_eps_is_default = train_eps, sample_eps, sample_eps_is_default

    def prior_logp(self, z: th.Tensor) -> th.Tensor:
        """Log-density of a standard normal prior per sample. z: (N, ...) -> (N,)."""
        num_dims = z[0].numel()
        return -num_dims / 2.0 * math.log(2 * math.pi) - th.sum(z.flatten(1) ** 2, dim=1) / 2.0

    def check_interval(self, train_eps, sample_eps, *, diffusion_form="SBDM", sde=False, reverse=False,
                       eval=False, last_step_size=0.0):
        """The time interval (t0, t1) to train on or integrate over, away from singular ends ((start, end)
        from data back to noise with reverse)."""
        t0, t1 = 0, 1
        eps = train_eps if not eval else sample_eps
        data_end = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if isinstance(self.path_sampler, path.VPCPlan):
            t1 = data_end
        elif self.model_type != ModelType.VELOCITY or sde or eps > 0:  # Linear and GVP
            # eps is 0 for velocity models unless the user gave one: then the original's [0, 1]
            t0 = eps
            if diffusion_form == "SBDM" and sde and t0 == 0:  # its diffusion has 1/t at t=0: start inside
                if not self.sample_eps_is_default:
                    raise ValueError("diffusion form SBDM diverges at t=0 on the Linear and GVP paths; "
                                     "pass a positive --sample-eps (e.g. 1e-3) or choose another --diffusion-form")
                t0 = DEFAULT_SAMPLE_EPS
            t1 = data_end
        if reverse and self.model_type == ModelType.NOISE and isinstance(self.path_sampler, path.VPCPlan):
            return t1, t0  # a noise model's drift divides by sigma_1 = 0 (the original's reflection gives NaN)
        return (1 - t0, 1 - t1) if reverse else (t0, t1)  # reverse: the original's reflection

    def vanishes_at(self, coefficient: Callable, t: float) -> bool:
        """Whether a path coefficient (path_sampler.compute_alpha_t or compute_sigma_t) is zero at time t."""
        value = coefficient(th.tensor([float(t)], dtype=th.float64))[0]
        return bool(th.as_tensor(value).abs().max() < VANISHING)

    def check_drift_finite(self, *times: float) -> None:
        """ValueError if the probability-flow drift is undefined at one of the times: score and noise models
        divide by alpha_t (zero at t=0 on Linear and GVP), noise models also by sigma_t."""
        plan = self.path_sampler
        for t in times:
            if self.model_type != ModelType.VELOCITY and (self.vanishes_at(plan.compute_alpha_t, t) or (
                    self.model_type == ModelType.NOISE and self.vanishes_at(plan.compute_sigma_t, t))):
                prediction = self.model_type.name.lower()
                raise ValueError(f"a {prediction} model's drift is undefined at t={t} on the {self.path_type.name} "
                                 f"path; pass a positive --sample-eps (e.g. 1e-3)")

    def sample(self, x1: th.Tensor):
        """Draw noise x0 and times t for data x1: (N, ...), in the original's order (x0 first)."""
        x0 = th.randn_like(x1)
        t0, t1 = self.check_interval(self.train_eps, self.sample_eps)
        unit = th.rand((x1.shape[0],)) if self.time_schedule is None else self.time_schedule.draw(x1.shape[0])
        return (unit * (t1 - t0) + t0).to(x1), x0, x1

    def training_losses(self, model: Callable, x1: th.Tensor, model_kwargs: Optional[dict] = None) -> dict:
        """Per-sample loss of `model` on data x1: (N, ...): {"loss": (N,), "pred": the output (N, ...), "x_t":
        its input, "t": (N,), "target": the path's velocity at x_t, t}."""
        t, x0, x1 = self.sample(x1)
        t, xt, ut = self.path_sampler.plan(t, x0, x1)
        model_output = model(xt, t, **(model_kwargs or {}))
        if model_output.shape != xt.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)} differs from its input's {tuple(xt.shape)}")
        terms = {"pred": model_output, "x_t": xt, "t": t, "target": ut}
        if self.model_type == ModelType.VELOCITY:
            terms["loss"] = mean_flat((model_output - ut) ** 2)
            return terms
        _, drift_var = self.path_sampler.compute_drift(xt, t)
        sigma_t, _ = self.path_sampler.compute_sigma_t(path.expand_t_like_x(t, xt))
        if self.loss_type == WeightType.VELOCITY:
            weight = (drift_var / sigma_t) ** 2
        elif self.loss_type == WeightType.LIKELIHOOD:
            weight = drift_var / (sigma_t ** 2)
        else:
            weight = 1
        error = model_output - x0 if self.model_type == ModelType.NOISE else model_output * sigma_t + x0
        terms["loss"] = mean_flat(weight * (error ** 2))
        return terms

    def model_output(self, x: th.Tensor, t: th.Tensor, model: Callable, **model_kwargs) -> th.Tensor:
        """The model's output at x: (N, ...), t: (N,), cast to x's dtype (float64 states stay float64)."""
        output = model(x, t, **model_kwargs).to(x.dtype)
        if output.shape != x.shape:
            raise ValueError(f"model output shape {tuple(output.shape)} differs from its input's {tuple(x.shape)}")
        return output

    def drift_from_output(self, output: th.Tensor, x: th.Tensor, t: th.Tensor) -> th.Tensor:
        """The probability-flow velocity at x: (N, ...), t: (N,) from the model's output there."""
        if self.model_type == ModelType.VELOCITY:
            return output
        drift_mean, drift_var = self.path_sampler.compute_drift(x, t)
        if self.model_type == ModelType.NOISE:
            sigma_t, _ = self.path_sampler.compute_sigma_t(path.expand_t_like_x(t, x))
            output = output / -sigma_t
        return -drift_mean + drift_var * output

    def score_from_output(self, output: th.Tensor, x: th.Tensor, t: th.Tensor) -> th.Tensor:
        """The score grad log p_t(x) at x: (N, ...), t: (N,) from the model's output there."""
        if self.model_type == ModelType.NOISE:
            return output / -self.path_sampler.compute_sigma_t(path.expand_t_like_x(t, x))[0]
        if self.model_type == ModelType.SCORE:
            return output
        return self.path_sampler.get_score_from_velocity(output, x, t)

    def get_drift(self) -> Callable:
        """The probability-flow ODE's velocity as a function (x, t, model, **model_kwargs)."""
        return lambda x, t, model, **kwargs: self.drift_from_output(self.model_output(x, t, model, **kwargs), x, t)

    def get_score(self) -> Callable:
        """The score grad log p_t(x) as a function (x, t, model, **model_kwargs)."""
        return lambda x, t, model, **kwargs: self.score_from_output(self.model_output(x, t, model, **kwargs), x, t)

    def get_drift_and_score(self) -> Callable:
        """(drift, score) from one model call, as a function (x, t, model, **model_kwargs)."""
        def drift_and_score_fn(x, t, model, **model_kwargs):
            output = self.model_output(x, t, model, **model_kwargs)
            return self.drift_from_output(output, x, t), self.score_from_output(output, x, t)
        return drift_and_score_fn


class SampleFunction:
    """The function a Sampler returns, fn(x, model, **model_kwargs); after each call `nfe` holds how many
    times the model was evaluated (adaptive solvers choose that themselves)."""

    def __init__(self, run: Callable):
        self.run = run
        self.nfe = 0

    def __call__(self, x, model, **model_kwargs):
        self.nfe = 0

        def counted(*args, **kwargs):
            self.nfe += 1
            return model(*args, **kwargs)

        return self.run(x, counted, **model_kwargs)


class LikelihoodResult(NamedTuple):
    """(logp, prior_sample) as the original returns, plus bits_per_dim: -logp / (D ln 2)."""
    logp: th.Tensor  # (N,) nats
    prior_sample: th.Tensor  # (N, ...)

    @property
    def bits_per_dim(self) -> th.Tensor:
        return -self[0] / (self[1][0].numel() * math.log(2))


class Sampler:
    """ODE, SDE and likelihood samplers for a Transport."""

    def __init__(self, transport: Transport):
        if not isinstance(transport, Transport):
            raise TypeError(f"Sampler(transport): transport must be a Transport (from create_transport), "
                            f"got {type(transport).__name__}")
        self.transport = transport
        self.drift, self.score = transport.get_drift(), transport.get_score()
        self.drift_and_score = transport.get_drift_and_score()

    def _sde_drift_and_diffusion(self, *, diffusion_form: str = "SBDM", diffusion_norm: float = 1.0):
        path_sampler = self.transport.path_sampler

        def diffusion_fn(x, t):
            return path_sampler.compute_diffusion(x, t, form=diffusion_form, norm=diffusion_norm)

        def sde_drift(x, t, model, **model_kwargs):
            # drift v + w(t) * score keeps p_t for any w(t) >= 0 with diffusion sqrt(2 w(t)) dW
            drift, score = self.drift_and_score(x, t, model, **model_kwargs)
            return drift + diffusion_fn(x, t) * score

        return sde_drift, diffusion_fn

    def sample_sde(self, *, sampling_method: str = "Euler", diffusion_form: str = "SBDM", diffusion_norm: float = 1.0,
                   last_step: Optional[str] = "Mean", last_step_size: float = 0.04, num_steps: int = 250,
                   keep_trajectory: bool = True, time_shift: Optional[float] = None) -> SampleFunction:
        """A function fn(x, model, **model_kwargs) integrating the SDE from noise x: (N, ...) on num_steps
        grid points (shifted by time_shift, transport.schedules), then the last step: the list of states,
        `[-1]` the sample (only `[sample]` without keep_trajectory)."""
        check_choice("sampling_method", sampling_method, SDE_METHODS)
        check_choice("diffusion_form", diffusion_form, path.DIFFUSION_FORMS)
        check_real("diffusion_norm", diffusion_norm, minimum=0.0)
        check_choice("last_step", last_step, LAST_STEPS)
        check_real("last_step_size", last_step_size)
        check_integer("num_steps", num_steps, 1)
        check_flag("keep_trajectory", keep_trajectory)
        if time_shift is not None:
            check_real("time_shift", time_shift, positive=True)
        if num_steps < 2:
            raise ValueError(f"the SDE sampler needs at least 2 steps, got {num_steps}")
        if last_step is None:
            last_step_size = 0.0
        elif last_step_size <= 0:
            raise ValueError(f"last step size must be positive, got {last_step_size}")
        sde_drift, sde_diffusion = self._sde_drift_and_diffusion(diffusion_form=diffusion_form, diffusion_norm=diffusion_norm)
        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps, sde=True,
                                               eval=True, diffusion_form=diffusion_form,
                                               last_step_size=last_step_size)
        if t0 >= t1:
            raise ValueError(f"last_step_size {last_step_size} (--last-step-size) and sample_eps {self.transport.sample_eps} "
                             f"(--sample-eps) leave no time to integrate (from t={t0} to t={t1}): keep them below 1 together")
        self.transport.check_drift_finite(t0)
        if sampling_method == "Heun" and last_step is None and self.transport.vanishes_at(
                self.transport.path_sampler.compute_sigma_t, t1):
            raise ValueError("SDE Heun with no last step evaluates the score at t=1, where it is undefined for this "
                             "path; pass --last-step Mean (or Tweedie, Euler) or a positive --sample-eps")
        solver = SDESolver(sde_drift, sde_diffusion, t0=t0, t1=t1, num_steps=num_steps, sampler_type=sampling_method,
                           grid_transform=_shifted_grid(time_shift, t0, t1))
        last_step_fn = functools.partial(LAST_STEPS[last_step], self, sde_drift, last_step_size)  # from t1 to about 1

        def run(init, model, **model_kwargs):
            xs = solver.sample(init, model, keep_trajectory=keep_trajectory, **model_kwargs)
            ts = th.ones(init.size(0), dtype=init.dtype, device=init.device) * t1
            with th.no_grad():
                x = last_step_fn(xs[-1], ts, model, **model_kwargs)
            return xs + [x] if keep_trajectory else [x]

        return SampleFunction(run)

    def sample_ode(self, *, sampling_method: str = "dopri5", num_steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3,
                   reverse: bool = False, keep_trajectory: bool = True, time_shift: Optional[float] = None) -> SampleFunction:
        """A function fn(x, model, **model_kwargs) solving the probability-flow ODE from x: (N, ...) (data to
        noise with reverse): the states (num_steps, N, ...) at the grid's times (fixed-step methods' grid,
        shifted by time_shift), `[-1]` the sample; (1, N, ...) without keep_trajectory."""
        check_ode_arguments(sampling_method, num_steps, atol, rtol)
        check_flag("reverse", reverse)
        check_flag("keep_trajectory", keep_trajectory)
        if time_shift is not None:
            check_real("time_shift", time_shift, positive=True)
        if time_shift is not None and (is_adaptive(sampling_method) or sampling_method == "scipy_solver"):
            raise ValueError(f"time_shift (--time-shift) places the steps of fixed-step samplers; {sampling_method} "
                             f"chooses its own steps: pick a fixed-step method (euler, heun2, midpoint, rk4, ...) or "
                             f"drop the time shift")
        transport = self.transport
        t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, eval=True,
                                          reverse=reverse)
        transport.check_drift_finite(t0, t1)
        # an adaptive solver steps past t=1 and interpolates back, as the original, except where a noise model
        # on VP would divide by sigma_t, imaginary beyond
        stop_at_end = transport.model_type == ModelType.NOISE and transport.path_type == PathType.VP
        solver = ODESolver(self.drift, t0=t0, t1=t1, sampler_type=sampling_method, num_steps=num_steps,
                           atol=atol, rtol=rtol, stop_at_end=stop_at_end,
                           grid_transform=_shifted_grid(time_shift, t0, t1))

        def run(x, model, **model_kwargs):
            with th.no_grad():
                trajectory = solver.sample(x, model, **model_kwargs)
            return trajectory if keep_trajectory else trajectory[-1:].clone()

        return SampleFunction(run)

    def sample_ode_likelihood(self, *, sampling_method: str = "dopri5", num_steps: int = 50, atol: float = 1e-6,
                              rtol: float = 1e-3, num_probes: int = 1, exact_trace: bool = False) -> SampleFunction:
        """A function fn(x, model, **model_kwargs) -> LikelihoodResult of data x: (N, ...), integrating the
        ODE from data to noise with the drift's divergence: Hutchinson's estimate with num_probes Rademacher
        probes (1: the original's), or with exact_trace one autograd pass per dimension."""
        check_ode_arguments(sampling_method, num_steps, atol, rtol)
        check_integer("num_probes", num_probes, 1)
        check_flag("exact_trace", exact_trace)
        if exact_trace and num_probes != 1:
            raise ValueError("exact_trace computes the divergence without probes; leave num_probes at 1")
        divergence_fn = exact_divergence if exact_trace else hutchinson_divergence

        def likelihood_drift(state, s, model, **model_kwargs):
            x, _ = state
            t = th.ones_like(s) * (1 - s)  # solver time s runs 0 -> 1 while t runs 1 (data) -> 0 (noise)
            with th.enable_grad():
                x = x.detach().requires_grad_(True)
                drift = self.drift(x, t, model, **model_kwargs)
                divergence = divergence_fn(drift, x, num_probes)
            return -drift.detach(), divergence.detach()

        t_start, t_end = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps,
                                                       eval=True, reverse=True)
        self.transport.check_drift_finite(t_start, t_end)
        solver = ODESolver(likelihood_drift, t0=1 - t_start, t1=1 - t_end, sampler_type=sampling_method,
                           num_steps=num_steps, atol=atol, rtol=rtol)

        def run(x, model, **model_kwargs):
            init_logp = th.zeros(x.size(0), dtype=x.dtype, device=x.device)
            states, delta_logp = solver.sample((x, init_logp), model, **model_kwargs)
            prior_sample, delta_logp = states[-1], delta_logp[-1]
            logp = self.transport.prior_logp(prior_sample) - delta_logp
            return LikelihoodResult(logp.detach(), prior_sample.detach())

        return SampleFunction(run)


def check_ode_arguments(sampling_method: Any, num_steps: Any, atol: Any, rtol: Any) -> None:
    """TypeError/ValueError naming the first bad argument of sample_ode or sample_ode_likelihood."""
    check_choice("sampling_method", sampling_method, ODE_METHODS)
    check_integer("num_steps", num_steps, 1)
    if num_steps < 2:
        raise ValueError(f"the ODE sampler needs at least 2 steps, got {num_steps}")
    check_real("atol", atol, positive=True)
    check_real("rtol", rtol, positive=True)


def _shifted_grid(time_shift: Optional[float], t0: float, t1: float) -> Optional[Callable[[th.Tensor], th.Tensor]]:
    """The grid transform of a time shift over the interval between t0 and t1 (None: none)."""
    if time_shift is None:
        return None
    return functools.partial(shifted_unit_grid, shift=time_shift, low=min(t0, t1), high=max(t0, t1))


def hutchinson_divergence(drift: th.Tensor, x: th.Tensor, num_probes: int = 1) -> th.Tensor:
    """Hutchinson's estimate E[eps^T (d drift / dx) eps] of the divergence, Rademacher probes eps drawn as the
    original's. drift: (N, ...) computed from x: (N, ...) with grad enabled. Returns (N,)."""
    total = th.zeros(x.size(0), dtype=x.dtype, device=x.device)
    for index in range(num_probes):
        eps = (th.randint(2, x.size(), dtype=th.float, device=x.device) * 2 - 1).to(x.dtype)
        grad = th.autograd.grad(th.sum(drift * eps), x, retain_graph=index < num_probes - 1)[0]
        total = total + th.sum(grad * eps, dim=tuple(range(1, x.dim())))
    return total / num_probes


def exact_divergence(drift: th.Tensor, x: th.Tensor, num_probes: int = 1) -> th.Tensor:
    """The exact divergence sum_i d drift_i / d x_i, one autograd pass per dimension; num_probes unused.
    drift: (N, ...) computed from x: (N, ...) with grad enabled (samples independent). Returns (N,)."""
    drift_flat = drift.reshape(drift.size(0), -1)  # (N, D)
    num_dims = drift_flat.size(1)
    total = th.zeros(x.size(0), dtype=x.dtype, device=x.device)
    for i in range(num_dims):
        grad = th.autograd.grad(drift_flat[:, i].sum(), x, retain_graph=i < num_dims - 1)[0]
        total = total + grad.reshape(grad.size(0), -1)[:, i]  # (N, D) -> d drift_i / d x_i: (N,)
    return total


def tweedie_last_step(sampler: Sampler, sde_drift: Callable, step_size: float, x, t, model, **model_kwargs):
    """E[x1 | x_t] = (x + sigma^2 score) / alpha; as the original, with the first sample's t."""
    plan = sampler.transport.path_sampler
    alpha = plan.compute_alpha_t(t)[0][0]
    sigma = plan.compute_sigma_t(t)[0][0]
    return x / alpha + (sigma ** 2) / alpha * sampler.score(x, t, model, **model_kwargs)


# --last-step choice -> the step from (sampler, SDE drift, step size, x: (N, ...), t: (N,), model, kwargs);
# drives the argparse choices and Sampler.sample_sde. Mean: an SDE step without noise; Euler: an ODE step.
LAST_STEPS = {
    None: lambda sampler, drift, size, x, t, model, **kwargs: x,
    "Mean": lambda sampler, drift, size, x, t, model, **kwargs: x + drift(x, t, model, **kwargs) * size,
    "Tweedie": tweedie_last_step,
    "Euler": lambda sampler, drift, size, x, t, model, **kw: x + sampler.drift(x, t, model, **kw) * size,
}
