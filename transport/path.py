"""Interpolants x_t = alpha_t * x1 + sigma_t * x0 (x1 data, x0 noise, t=1 data): linear `ICPlan`,
trigonometric `GVPCPlan`, variance-preserving `VPCPlan`. `compute_*` without x take t shaped like x."""
from __future__ import annotations

import math

import torch as th

def expand_t_like_x(t: th.Tensor, x: th.Tensor) -> th.Tensor:
    """Reshape a time vector t: (N,) to (N, 1, ..., 1) so that it broadcasts against x: (N, ...)."""
    dims = [1] * (x.dim() - 1)
    return t.view(t.size(0), *dims)


class ICPlan:
    """Linear interpolant: alpha_t = t, sigma_t = 1 - t."""

    def __init__(self, sigma: float = 0.0):
        self.sigma = sigma

    def compute_alpha_t(self, t):
        """alpha_t and its time derivative."""
        return t, 1

    def compute_sigma_t(self, t):
        """sigma_t and its time derivative."""
        return 1 - t, -1

    def compute_d_alpha_alpha_ratio_t(self, t):
        """d(alpha_t)/dt / alpha_t."""
        return 1 / t

    def compute_drift(self, x: th.Tensor, t: th.Tensor):
        """(drift_mean, drift_var), broadcastable against x: v = -drift_mean + drift_var * score."""
        t = expand_t_like_x(t, x)
        alpha_ratio = self.compute_d_alpha_alpha_ratio_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        drift = alpha_ratio * x
        diffusion = alpha_ratio * (sigma_t ** 2) - sigma_t * d_sigma_t
        return -drift, diffusion

    def compute_diffusion(self, x: th.Tensor, t: th.Tensor, form: str = "constant", norm: float = 1.0) -> th.Tensor:
        """Diffusion coefficient w(t) of the SDE sampler (form: a key of DIFFUSION_FORMS): (N, 1, ..., 1)."""
        if form not in DIFFUSION_FORMS:
            raise ValueError(f"unknown diffusion form {form!r}; choose one of {', '.join(DIFFUSION_FORMS)}")
        return DIFFUSION_FORMS[form](self, x, expand_t_like_x(t, x), norm)

    def _velocity_coefficients(self, x: th.Tensor, t: th.Tensor) -> tuple:
        """(alpha_t / d_alpha_t, sigma_t, d_sigma_t), each broadcastable against x. t: (N,)."""
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return alpha_t / d_alpha_t, sigma_t, d_sigma_t

    def get_score_from_velocity(self, velocity: th.Tensor, x: th.Tensor, t: th.Tensor) -> th.Tensor:
        """Score grad log p_t(x) from a velocity prediction. velocity, x: (N, ...); t: (N,)."""
        reverse_alpha_ratio, sigma_t, d_sigma_t = self._velocity_coefficients(x, t)
        var = sigma_t ** 2 - reverse_alpha_ratio * d_sigma_t * sigma_t
        return (reverse_alpha_ratio * velocity - x) / var

    def get_noise_from_velocity(self, velocity: th.Tensor, x: th.Tensor, t: th.Tensor) -> th.Tensor:
        """Noise x0 from a velocity prediction. velocity, x: (N, ...); t: (N,)."""
        reverse_alpha_ratio, sigma_t, d_sigma_t = self._velocity_coefficients(x, t)
        var = reverse_alpha_ratio * d_sigma_t - sigma_t
        return (reverse_alpha_ratio * velocity - x) / var

    def get_velocity_from_score(self, score: th.Tensor, x: th.Tensor, t: th.Tensor) -> th.Tensor:
        """Velocity from a score prediction. score, x: (N, ...); t: (N,)."""
        drift, var = self.compute_drift(x, t)
        return var * score - drift

    def compute_mu_t(self, t: th.Tensor, x0: th.Tensor, x1: th.Tensor) -> th.Tensor:
        """Mean of the interpolant alpha_t * x1 + sigma_t * x0. t: (N,)."""
        t = expand_t_like_x(t, x1)
        alpha_t, _ = self.compute_alpha_t(t)
        sigma_t, _ = self.compute_sigma_t(t)
        return alpha_t * x1 + sigma_t * x0

    def compute_xt(self, t: th.Tensor, x0: th.Tensor, x1: th.Tensor) -> th.Tensor:
        """Sample x_t of the interpolant (deterministic given x0, x1)."""
        return self.compute_mu_t(t, x0, x1)

    def compute_ut(self, t: th.Tensor, x0: th.Tensor, x1: th.Tensor, xt: th.Tensor) -> th.Tensor:
        """Conditional velocity d(x_t)/dt."""
        t = expand_t_like_x(t, x1)
        _, d_alpha_t = self.compute_alpha_t(t)
        _, d_sigma_t = self.compute_sigma_t(t)
        return d_alpha_t * x1 + d_sigma_t * x0

    def plan(self, t: th.Tensor, x0: th.Tensor, x1: th.Tensor):
        """(t, x_t, u_t) for noise x0 and data x1, both (N, ...); t: (N,)."""
        xt = self.compute_xt(t, x0, x1)
        ut = self.compute_ut(t, x0, x1, xt)
        return t, xt, ut


class VPCPlan(ICPlan):
    """Variance-preserving path with a linear beta schedule from sigma_min to sigma_max."""

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 20.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def log_mean_coeff(self, t):
        """log(alpha_t)."""
        return -0.25 * ((1 - t) ** 2) * (self.sigma_max - self.sigma_min) - 0.5 * (1 - t) * self.sigma_min

    def d_log_mean_coeff(self, t):
        """d log(alpha_t) / dt."""
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def compute_alpha_t(self, t):
        alpha_t = th.exp(self.log_mean_coeff(t))
        d_alpha_t = alpha_t * self.d_log_mean_coeff(t)
        return alpha_t, d_alpha_t

    def compute_sigma_t(self, t):
        p_sigma_t = 2 * self.log_mean_coeff(t)
        sigma_t = th.sqrt(1 - th.exp(p_sigma_t))
        d_sigma_t = th.exp(p_sigma_t) * (2 * self.d_log_mean_coeff(t)) / (-2 * sigma_t)
        return sigma_t, d_sigma_t

    def compute_d_alpha_alpha_ratio_t(self, t):
        return self.d_log_mean_coeff(t)

    def compute_drift(self, x: th.Tensor, t: th.Tensor):
        t = expand_t_like_x(t, x)
        beta_t = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta_t * x, beta_t / 2


class GVPCPlan(ICPlan):
    """Trigonometric path: alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)."""

    def compute_alpha_t(self, t):
        alpha_t = th.sin(t * math.pi / 2)
        d_alpha_t = math.pi / 2 * th.cos(t * math.pi / 2)
        return alpha_t, d_alpha_t

    def compute_sigma_t(self, t):
        sigma_t = th.cos(t * math.pi / 2)
        d_sigma_t = -math.pi / 2 * th.sin(t * math.pi / 2)
        return sigma_t, d_sigma_t

    def compute_d_alpha_alpha_ratio_t(self, t):
        return math.pi / (2 * th.tan(t * math.pi / 2))


# --diffusion-form choice -> w(t) of the plan, x: (N, ...), t: (N, 1, ..., 1) and the norm (Tab. 2 of the
# SiT paper); drives the argparse choices and compute_diffusion alike. SBDM: the drift's variance term.
DIFFUSION_FORMS = {
    "constant": lambda plan, x, t, norm: th.full_like(t, norm),
    "SBDM": lambda plan, x, t, norm: norm * plan.compute_drift(x, t)[1],
    "sigma": lambda plan, x, t, norm: norm * plan.compute_sigma_t(t)[0],
    "linear": lambda plan, x, t, norm: norm * (1 - t),
    "decreasing": lambda plan, x, t, norm: 0.25 * (norm * th.cos(math.pi * t) + 1) ** 2,
    "increasing-decreasing": lambda plan, x, t, norm: norm * th.sin(math.pi * t) ** 2,
}
