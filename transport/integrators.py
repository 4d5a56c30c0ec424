"""Time integrators from t0 to t1 on num_steps points (through `grid_transform`, e.g. a time shift), in the
state's dtype: the torchdiffeq call for ODEs and fixed-grid SDE steppers."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch as th
from torchdiffeq import odeint
from torchdiffeq._impl.odeint import SOLVERS as TORCHDIFFEQ_SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

ODE_METHODS = tuple(sorted(TORCHDIFFEQ_SOLVERS))
# Fixed-grid methods that never read atol/rtol (the Adams-Bashforth-Moulton corrector of fixed_adams and
# implicit_adams does); the adaptive ones choose their own steps, so num_steps only sets the output grid.
TOLERANCE_FREE_METHODS = ("euler", "midpoint", "rk4", "heun2", "heun3", "explicit_adams")
ADAPTIVE_METHODS = tuple(name for name in ODE_METHODS if issubclass(TORCHDIFFEQ_SOLVERS[name], RKAdaptiveStepsizeODESolver))
SDE_METHODS = ("Euler", "Heun")

State = Union[th.Tensor, tuple]
GridTransform = Callable[[th.Tensor], th.Tensor]  # (n,) uniform grid -> (n,) grid, same end points


def is_adaptive(sampling_method: str) -> bool:
    """Whether a torchdiffeq method chooses its own steps (its grid only says where to report)."""
    return sampling_method in ADAPTIVE_METHODS


def _batch_times(t: th.Tensor, x: th.Tensor) -> th.Tensor:
    """Broadcast a scalar time to a (N,) vector in x's dtype and device."""
    return th.ones(x.size(0), dtype=x.dtype, device=x.device) * t


def _step_noise(x: th.Tensor) -> th.Tensor:
    """Standard normal noise shaped like x: (N, ...), drawn on the CPU generator (the original's draw) into
    pinned memory for a GPU state and copied without waiting (no synchronisation per step)."""
    noise = th.randn(x.size(), dtype=x.dtype, pin_memory=x.is_cuda)
    return noise.to(x.device, non_blocking=x.is_cuda)


class SDESolver:
    """Fixed-grid SDE integration dx = drift dt + sqrt(2 w(t)) dW from t0 to t1 (t0 < t1), each step's noise
    from the CPU generator (_step_noise). sampler_type: one of SDE_METHODS (checked by Sampler.sample_sde)."""

    def __init__(self, drift: Callable, diffusion: Callable, *, t0: float, t1: float, num_steps: int, sampler_type: str,
                 grid_transform: Optional[GridTransform] = None):
        self.t0, self.t1, self.num_timesteps = t0, t1, num_steps
        self.drift, self.diffusion, self.sampler_type, self.grid_transform = drift, diffusion, sampler_type, grid_transform

    def grid(self, dtype: th.dtype) -> th.Tensor:
        """The time grid (num_steps,) in the given dtype."""
        grid = th.linspace(self.t0, self.t1, self.num_timesteps, dtype=dtype)
        return grid if self.grid_transform is None else self.grid_transform(grid)

    def euler_maruyama_step(self, x, t, dt, model, **model_kwargs):
        dw = _step_noise(x) * th.sqrt(dt)
        t = _batch_times(t, x)
        mean_x = x + self.drift(x, t, model, **model_kwargs) * dt
        return mean_x + th.sqrt(2 * self.diffusion(x, t)) * dw

    def heun_step(self, x, t, dt, model, **model_kwargs):
        dw = _step_noise(x) * th.sqrt(dt)
        t_cur = _batch_times(t, x)
        xhat = x + th.sqrt(2 * self.diffusion(x, t_cur)) * dw
        k1 = self.drift(xhat, t_cur, model, **model_kwargs)
        k2 = self.drift(xhat + dt * k1, t_cur + dt, model, **model_kwargs)
        return xhat + 0.5 * dt * (k1 + k2)

    def sample(self, init: th.Tensor, model: Callable, keep_trajectory: bool = True, **model_kwargs) -> list:
        """Integrate from init: (N, ...). Returns the states after each step (only the last one
        when keep_trajectory is False)."""
        step = self.euler_maruyama_step if self.sampler_type == "Euler" else self.heun_step
        grid = self.grid(init.dtype)
        dt = grid[1] - grid[0]  # the original's one step size; a transformed grid steps by its own gaps
        steps = grid[1:] - grid[:-1] if self.grid_transform is not None else None
        x, samples = init, []
        with th.no_grad():
            for index, ti in enumerate(grid[:-1]):
                x = step(x, ti, dt if steps is None else steps[index], model, **model_kwargs)
                samples = samples + [x] if keep_trajectory else [x]
        return samples


class ODESolver:
    """torchdiffeq integration of dx/dt = drift(x, t) from t0 to t1 (either order)."""

    def __init__(self, drift: Callable, *, t0: float, t1: float, sampler_type: str, num_steps: int, atol: float, rtol: float,
                 stop_at_end: bool = False, grid_transform: Optional[GridTransform] = None):
        """stop_at_end: keep an adaptive solver from stepping past t1; grid_transform: applied to the uniform
        grid; sampler_type: one of ODE_METHODS (checked by the Sampler)."""
        self.drift, self.t0, self.t1, self.num_steps, self.atol, self.rtol = drift, t0, t1, num_steps, atol, rtol
        self.sampler_type, self.grid_transform = sampler_type, grid_transform
        self.stop_at_end = stop_at_end and is_adaptive(sampler_type)

    def sample(self, x: State, model: Callable, **model_kwargs) -> Union[th.Tensor, Sequence[th.Tensor]]:
        """Integrate from x (a tensor or a tuple of tensors): odeint's states at the num_steps grid times,
        stacked on dim 0 (a tuple of such for a tuple state)."""
        first = x[0] if isinstance(x, tuple) else x

        def ode_fn(t, state):
            first_state = state[0] if isinstance(state, tuple) else state
            return self.drift(state, _batch_times(t, first_state), model, **model_kwargs)

        grid = th.linspace(self.t0, self.t1, self.num_steps, dtype=first.dtype).to(first.device)
        if self.grid_transform is not None:
            grid = self.grid_transform(grid)
        num_parts = len(x) if isinstance(x, tuple) else 1
        options = {"step_t": grid[-1:]} if self.stop_at_end else None
        return odeint(ode_fn, x, grid, method=self.sampler_type, atol=[self.atol] * num_parts, rtol=[self.rtol] * num_parts,
                      options=options)
