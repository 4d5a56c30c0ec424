"""transport/schedules.py: training time draws (uniform, logit-normal, shifted) against closed forms,
and the shifted fixed-step grids of the ODE and SDE samplers (sit.config's time_shift)."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from sit.config import ODEConfig, SDEConfig, TransportConfig, build_sample_fn
from sit.sampling.families import family
from transport import Sampler, create_transport
from transport.schedules import TimeSchedule, shift_time, shifted_unit_grid

NUM_DRAWS = 400_000


def logit_normal_moments(mean: float, std: float) -> tuple[float, float]:
    """E[t] and Var[t] of t = sigmoid(mean + std n), n ~ N(0, 1), by numerical integration over n."""
    def moment(power: int) -> float:
        density = lambda n: math.exp(-n * n / 2) / math.sqrt(2 * math.pi)  # noqa: E731
        return integrate.quad(lambda n: (1 / (1 + math.exp(-(mean + std * n)))) ** power * density(n), -40, 40)[0]

    first = moment(1)
    return first, moment(2) - first ** 2


def shifted_uniform_moments(shift: float) -> tuple[float, float]:
    """E[t'] and Var[t'] of t' = t / (t + s (1 - t)), t ~ U(0, 1), in closed form (s != 1):
    with a = 1 - s (so s + a = 1), E[t'] = 1/a + s ln(s) / a^2 and E[t'^2] = (1 - s^2 + 2 s ln s) / a^3."""
    a = 1 - shift
    first = 1 / a + shift * math.log(shift) / a ** 2
    second = (1 - shift ** 2 + 2 * shift * math.log(shift)) / a ** 3
    return first, second - first ** 2


def sample_moments(values: torch.Tensor) -> tuple[float, float, float]:
    """Mean, variance and the standard error of the mean."""
    values = values.double()
    return values.mean().item(), values.var().item(), values.std().item() / math.sqrt(len(values))


#################################################################################
#                                 The shift map                                 #
#################################################################################

@pytest.mark.parametrize("shift", [0.3, 1.0, 3.0, 10.0])
def test_shift_is_monotone_and_hits_0_and_1(shift):
    t = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    shifted = shift_time(t, shift)
    assert shifted[0].item() == 0.0 and shifted[-1].item() == 1.0
    assert bool((shifted[1:] > shifted[:-1]).all())
    inside = shifted[1:-1] - t[1:-1]
    if shift > 1:  # more time toward the noise end (t = 0): below the identity everywhere inside
        assert bool((inside < 0).all())
    elif shift < 1:
        assert bool((inside > 0).all())
    else:
        assert torch.equal(shifted, t)


def test_shift_is_sd3s_map_seen_from_the_other_end():
    """SD3's time u has noise at u = 1 and shifts u -> s u / (1 + (s - 1) u); ours is t = 1 - u."""
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (0.5, 3.0):
        sd3 = shift * u / (1 + (shift - 1) * u)
        torch.testing.assert_close(shift_time(1 - u, shift), 1 - sd3, rtol=0, atol=1e-15)
        # its inverse is the shift by 1 / s
        torch.testing.assert_close(shift_time(shift_time(u, shift), 1 / shift), u, rtol=0, atol=1e-15)


def test_shifted_grid_keeps_the_interval_ends():
    grid = torch.linspace(0.04, 0.96, 9, dtype=torch.float64)
    shifted = shifted_unit_grid(grid, 3.0, 0.04, 0.96)
    assert shifted[0].item() == pytest.approx(0.04, abs=1e-15) and shifted[-1].item() == pytest.approx(0.96, abs=1e-15)
    torch.testing.assert_close(shifted, 0.04 + 0.92 * shift_time((grid - 0.04) / 0.92, 3.0))
    assert shifted_unit_grid(grid, None, 0.04, 0.96) is grid


#################################################################################
#                         Training draws: closed forms                          #
#################################################################################

def test_uniform_is_the_original_draw_and_order():
    """x0 = randn_like(x1) first, then t = rand(B): the same numbers with or without a uniform schedule."""
    x1 = torch.zeros(5, 3, 2, 2)
    torch.manual_seed(7)
    expected_x0 = torch.randn_like(x1)
    expected_t = torch.rand((5,))
    for schedule in (None, TimeSchedule()):
        torch.manual_seed(7)
        t, x0, _ = create_transport(time_schedule=schedule).sample(x1)
        assert torch.equal(x0, expected_x0) and torch.equal(t, expected_t)
    assert TimeSchedule().is_original and TimeSchedule(shift=1.0).is_original
    assert not TimeSchedule(shift=2.0).is_original and not TimeSchedule("logit-normal").is_original


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.5, 0.8), (-1.0, 1.5)])
def test_logit_normal_moments_equal_the_integrals(mean, std):
    torch.manual_seed(0)
    t = TimeSchedule("logit-normal", mean=mean, std=std).draw(NUM_DRAWS)
    expected_mean, expected_var = logit_normal_moments(mean, std)
    sample_mean, sample_var, standard_error = sample_moments(t)
    assert abs(sample_mean - expected_mean) < 5 * standard_error
    assert sample_var == pytest.approx(expected_var, rel=0.01)
    assert float(t.min()) > 0 and float(t.max()) < 1


def test_standard_logit_normal_has_mean_one_half():
    """The known value: sigmoid(n) is symmetric about 1/2 for n ~ N(0, 1)."""
    assert logit_normal_moments(0.0, 1.0)[0] == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("shift", [0.5, 3.0])
def test_shifted_uniform_moments_equal_the_closed_form(shift):
    torch.manual_seed(1)
    t = TimeSchedule(shift=shift).draw(NUM_DRAWS)
    expected_mean, expected_var = shifted_uniform_moments(shift)
    # the closed form itself, against a numerical integral of t / (t + s (1 - t)) over U(0, 1)
    assert expected_mean == pytest.approx(integrate.quad(lambda u: u / (u + shift * (1 - u)), 0, 1)[0], rel=1e-9)
    sample_mean, sample_var, standard_error = sample_moments(t)
    assert abs(sample_mean - expected_mean) < 5 * standard_error
    assert sample_var == pytest.approx(expected_var, rel=0.01)


def test_shifted_logit_normal_is_the_shift_of_the_logit_normal_draw():
    torch.manual_seed(3)
    t = TimeSchedule("logit-normal", mean=0.2, std=0.7, shift=2.5).draw(6)
    torch.manual_seed(3)
    expected = shift_time(torch.sigmoid(0.2 + 0.7 * torch.randn(6)), 2.5)
    torch.testing.assert_close(t, expected, rtol=0, atol=0)


def test_transport_maps_the_draw_into_its_interval():
    """VP trains on [0, 1 - eps]: t = t0 + (t1 - t0) * draw, as the original does with rand."""
    schedule = TimeSchedule("logit-normal", shift=3.0)
    transport = create_transport("VP", time_schedule=schedule)
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps)
    x1 = torch.zeros(4, 2)
    torch.manual_seed(5)
    torch.randn_like(x1)
    expected = schedule.draw(4) * (t1 - t0) + t0
    torch.manual_seed(5)
    t, _, _ = transport.sample(x1)
    assert torch.equal(t, expected)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="unknown time sampling"):
        TimeSchedule("lognormal")
    with pytest.raises(ValueError, match="std must be positive"):
        TimeSchedule("logit-normal", std=0.0)
    with pytest.raises(ValueError, match="shift must be positive"):
        TimeSchedule(shift=-1.0)


#################################################################################
#                          Sampling: shifted fixed grids                        #
#################################################################################

class TimeRecorder:
    """A velocity 'model' -x that records the times it is called at."""

    def __init__(self):
        self.times = []

    def __call__(self, x, t, **kwargs):
        self.times.append(float(t[0]))
        return -x


def test_ode_euler_steps_on_the_shifted_grid():
    sampler = Sampler(create_transport())  # velocity on Linear: [0, 1]
    recorder = TimeRecorder()
    x = torch.ones(1, 2, dtype=torch.float64)
    out = sampler.sample_ode(sampling_method="euler", num_steps=6, time_shift=3.0)(x, recorder)
    grid = shift_time(torch.linspace(0, 1, 6, dtype=torch.float64), 3.0)
    assert recorder.times == pytest.approx(grid[:-1].tolist(), abs=1e-15)
    expected = x.clone()
    for start, end in zip(grid[:-1], grid[1:]):
        expected = expected + (end - start) * -expected  # Euler on dx/dt = -x
    torch.testing.assert_close(out[-1], expected, rtol=1e-12, atol=0)


def test_ode_without_shift_is_unchanged_and_reverse_shifts_toward_noise_too():
    sampler = Sampler(create_transport())
    x = torch.randn(2, 3, dtype=torch.float64)
    plain = sampler.sample_ode(sampling_method="euler", num_steps=5)(x, lambda x, t, **k: -x * t[:, None])
    same = sampler.sample_ode(sampling_method="euler", num_steps=5, time_shift=None)(x, lambda x, t, **k: -x * t[:, None])
    assert torch.equal(plain, same)
    recorder = TimeRecorder()
    sampler.sample_ode(sampling_method="euler", num_steps=5, reverse=True, time_shift=3.0)(x, recorder)
    # reverse integrates from data (t = 1) to noise (t = 0) on the same shifted times, so again more
    # of its steps lie near the noise end
    grid = shift_time(torch.linspace(1, 0, 5, dtype=torch.float64), 3.0)
    assert recorder.times == pytest.approx(grid[:-1].tolist(), abs=1e-12)
    assert grid[-2] - grid[-1] < grid[0] - grid[1]  # the last step (into noise) is the shortest


def test_sde_steps_by_the_shifted_gaps():
    transport = create_transport()
    sampler = Sampler(transport)
    recorder = TimeRecorder()
    x = torch.zeros(1, 2, dtype=torch.float64)
    sampler.sample_sde(num_steps=5, last_step=None, diffusion_form="constant", time_shift=2.0)(x, recorder)
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, diffusion_form="constant", sde=True,
                                      eval=True, last_step_size=0.0)
    grid = shifted_unit_grid(torch.linspace(t0, t1, 5, dtype=torch.float64), 2.0, t0, t1)
    # each step calls the model at its start time (drift; the score comes from the same output)
    starts = sorted(set(round(value, 12) for value in recorder.times))
    assert starts == pytest.approx(grid[:-1].tolist(), abs=1e-12)


def test_adaptive_solvers_refuse_a_time_shift():
    with pytest.raises(ValueError, match="dopri5 chooses its own steps"):
        Sampler(create_transport()).sample_ode(sampling_method="dopri5", time_shift=2.0)


def test_sampler_configs_carry_the_time_shift():
    ode_flags = dict(sampling_method="euler", num_sampling_steps=4, atol=1e-6, rtol=1e-3, reverse=False)
    assert family("ODE").from_flags(ode_flags).time_shift is None  # scripts without the flag
    config = family("ODE").from_flags(dict(ode_flags, time_shift=3.0))
    assert config == ODEConfig("euler", 4, time_shift=3.0)
    sde_flags = dict(sampling_method="Euler", num_sampling_steps=4, diffusion_form="sigma", diffusion_norm=1.0,
                     last_step="Mean", last_step_size=0.04, time_shift=2.0)
    assert family("SDE").from_flags(sde_flags) == SDEConfig("Euler", 4, time_shift=2.0)
    recorder = TimeRecorder()
    build_sample_fn(TransportConfig(), config)(torch.ones(1, 2), recorder)
    assert recorder.times == pytest.approx(shift_time(torch.linspace(0, 1, 4), 3.0)[:-1].tolist(), abs=1e-6)
    with pytest.raises(Exception, match="chooses its own steps"):
        build_sample_fn(TransportConfig(), ODEConfig(time_shift=2.0))  # dopri5: a UsageError
    np.testing.assert_equal(ODEConfig().time_shift, None)
    with pytest.raises(Exception, match="likelihood integration does not take it"):
        config.likelihood_fn(Sampler(create_transport()))
