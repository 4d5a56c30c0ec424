"""transport/: the original's defects stay fixed, bad names are refused clearly, and the samplers
report how many model evaluations they used. (Analytic correctness: test_transport_analytic.py.)"""
from __future__ import annotations

import math

import pytest
import torch

import transport as transport_pkg
from transport import (DEFAULT_SAMPLE_EPS, DIFFUSION_FORMS, LAST_STEPS, LOSS_WEIGHTS, ODE_METHODS, PATH_TYPES,
                       PREDICTIONS, SDE_METHODS, LikelihoodResult, Sampler, create_transport)
from transport.path import ICPlan


def pull_to_origin(x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
    """A smooth stand-in model: any prediction type accepts it."""
    return -0.5 * x


class CountingModel:
    """pull_to_origin, counting calls and recording the dtypes it sees."""

    def __init__(self):
        self.calls = 0
        self.dtypes = set()

    def __call__(self, x, t, **model_kwargs):
        self.calls += 1
        self.dtypes.update({x.dtype, t.dtype})
        return pull_to_origin(x, t)


def noise(shape=(6, 2, 4, 4), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


#################################################################################
#                           Names refused with a list                           #
#################################################################################

def assert_lists(error: pytest.ExceptionInfo, bad: str, valid) -> None:
    message = str(error.value)
    assert bad in message
    for name in valid:
        assert str(name) in message, (name, message)


@pytest.mark.parametrize("argument,table", [("path_type", PATH_TYPES), ("prediction", PREDICTIONS),
                                            ("loss_weight", LOSS_WEIGHTS)])
def test_unknown_transport_names_raise_listing_valid_ones(argument, table):
    with pytest.raises(ValueError) as error:
        create_transport(**{argument: "bogus"})
    assert_lists(error, "bogus", table)


def test_unknown_sampler_names_raise_listing_valid_ones():
    sampler = Sampler(create_transport())
    with pytest.raises(ValueError) as error:
        sampler.sample_ode(sampling_method="dopri55")
    assert_lists(error, "dopri55", ODE_METHODS)
    with pytest.raises(ValueError) as error:
        sampler.sample_ode_likelihood(sampling_method="rk5")
    assert_lists(error, "rk5", ODE_METHODS)
    with pytest.raises(ValueError) as error:
        sampler.sample_sde(sampling_method="Milstein")
    assert_lists(error, "Milstein", SDE_METHODS)
    with pytest.raises(ValueError) as error:
        sampler.sample_sde(diffusion_form="inccreasing-decreasing")  # the original's internal spelling
    assert_lists(error, "inccreasing-decreasing", DIFFUSION_FORMS)
    with pytest.raises(ValueError) as error:
        sampler.sample_sde(last_step="Median")
    assert_lists(error, "Median", LAST_STEPS)


@pytest.mark.parametrize("value", ["-1", "-0.5", "nan"])
def test_negative_diffusion_norm_is_refused_on_the_command_line(value, capsys):
    """sqrt(2 w(t)) of a negative norm gave NaN images silently."""
    import argparse

    from train_utils import parse_sde_args

    parser = argparse.ArgumentParser()
    parse_sde_args(parser)
    assert parser.parse_args(["--diffusion-norm", "0"]).diffusion_norm == 0.0
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--diffusion-norm", value])
    assert exit_info.value.code == 2
    assert f"--diffusion-norm: must be >= 0, got {value}" in capsys.readouterr().err


def test_known_names_and_none_string_are_accepted():
    assert create_transport("VP", "noise", "None").loss_type == transport_pkg.WeightType.NONE
    assert create_transport("GVP", "score", "likelihood").loss_type == transport_pkg.WeightType.LIKELIHOOD
    assert create_transport(transport_pkg.PathType.VP).path_type == transport_pkg.PathType.VP


#################################################################################
#                        train_eps / sample_eps defaults                        #
#################################################################################

@pytest.mark.parametrize("path_type,prediction,defaults", [
    ("Linear", "velocity", (0.0, 0.0)), ("GVP", "velocity", (0.0, 0.0)),
    ("Linear", "score", (1e-3, 1e-3)), ("GVP", "noise", (1e-3, 1e-3)),
    ("VP", "velocity", (1e-5, 1e-3)), ("VP", "noise", (1e-5, 1e-3)),
])
def test_eps_defaults_are_decided_independently_and_given_values_kept(path_type, prediction, defaults):
    default_train, default_sample = defaults
    both = create_transport(path_type, prediction)
    assert (both.train_eps, both.sample_eps) == defaults
    # the original: --train-eps alone left sample_eps None (crash) on VP/score/noise
    train_only = create_transport(path_type, prediction, train_eps=0.02)
    assert (train_only.train_eps, train_only.sample_eps) == (0.02, default_sample)
    # the original: --sample-eps alone was overwritten with 1e-3 (and with 0 for velocity)
    sample_only = create_transport(path_type, prediction, sample_eps=0.03)
    assert (sample_only.train_eps, sample_only.sample_eps) == (default_train, 0.03)


def test_given_eps_shapes_the_intervals_of_a_velocity_model():
    """The original set eps to 0 for velocity models on Linear/GVP whatever was asked; kept values act."""
    transport = create_transport("Linear", "velocity", train_eps=0.1, sample_eps=0.2)
    assert transport.check_interval(transport.train_eps, transport.sample_eps) == (0.1, 0.9)
    assert transport.check_interval(transport.train_eps, transport.sample_eps, eval=True) == (0.2, 0.8)
    seen = []

    def record_t(x, t, **model_kwargs):
        seen.append(t)
        return x

    transport.training_losses(record_t, torch.zeros(4000, 1))
    assert 0.1 <= seen[0].min() and seen[0].max() <= 0.9 and seen[0].max() - seen[0].min() > 0.75


def test_eps_out_of_range_is_refused():
    with pytest.raises(ValueError, match="sample_eps"):
        create_transport(sample_eps=-0.1)
    with pytest.raises(ValueError, match="train_eps"):
        create_transport(train_eps=0.5)


#################################################################################
#                          SDE defects of the original                          #
#################################################################################

@pytest.mark.parametrize("form", DIFFUSION_FORMS)
def test_every_diffusion_form_samples(form):
    """The original crashed on `constant` (sqrt of a float) and on `increasing-decreasing` (misspelt)."""
    out = Sampler(create_transport()).sample_sde(diffusion_form=form, num_steps=20)(noise(), pull_to_origin)
    assert out[-1].shape == noise().shape and torch.isfinite(out[-1]).all()


def test_constant_and_increasing_decreasing_values():
    plan = ICPlan()
    x, t = torch.zeros(3, 2), torch.tensor([0.0, 0.25, 0.5])
    torch.testing.assert_close(plan.compute_diffusion(x, t, form="constant", norm=0.7), torch.full((3, 1), 0.7))
    torch.testing.assert_close(plan.compute_diffusion(x, t, form="increasing-decreasing", norm=2.0),
                               torch.tensor([[0.0], [1.0], [2.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("path_type", ["Linear", "GVP"])
@pytest.mark.parametrize("method", SDE_METHODS)
def test_sbdm_with_a_velocity_model_is_finite(path_type, method):
    """The original started at t=0, where SBDM's diffusion has 1/t: NaN (issue #22)."""
    transport = create_transport(path_type, "velocity")
    t0, _ = transport.check_interval(transport.train_eps, transport.sample_eps, diffusion_form="SBDM", sde=True,
                                     eval=True, last_step_size=0.04)
    assert t0 == DEFAULT_SAMPLE_EPS
    out = Sampler(transport).sample_sde(sampling_method=method, diffusion_form="SBDM", num_steps=20)(noise(), pull_to_origin)
    assert torch.isfinite(out[-1]).all()


def test_sbdm_with_a_forced_zero_sample_eps_is_refused():
    sampler = Sampler(create_transport("Linear", "velocity", sample_eps=0.0))
    with pytest.raises(ValueError, match="--sample-eps"):
        sampler.sample_sde(diffusion_form="SBDM")
    given = create_transport("GVP", "velocity", sample_eps=0.01)
    assert given.check_interval(0.0, 0.01, diffusion_form="SBDM", sde=True, eval=True)[0] == 0.01


def test_heun_without_last_step_at_a_singular_end_is_refused():
    """The original evaluated the score at t=1, where sigma_t = 0: NaN."""
    for path_type in ("Linear", "GVP"):
        with pytest.raises(ValueError, match="--last-step"):
            Sampler(create_transport(path_type)).sample_sde(sampling_method="Heun", last_step=None)
    # VP stops at 1 - sample_eps: allowed and finite
    out = Sampler(create_transport("VP")).sample_sde(sampling_method="Heun", last_step=None, num_steps=20)(
        noise(), pull_to_origin)
    assert torch.isfinite(out[-1]).all()


@pytest.mark.parametrize("prediction", ["score", "noise"])
def test_a_drift_undefined_at_the_interval_end_is_refused(prediction):
    """Score and noise drifts divide by alpha_t (0 at t=0 on Linear): a forced sample_eps=0 is refused."""
    sampler = Sampler(create_transport("Linear", prediction, sample_eps=0.0))
    for build in (sampler.sample_ode, sampler.sample_ode_likelihood, sampler.sample_sde):
        with pytest.raises(ValueError, match="--sample-eps"):
            build()


#################################################################################
#                     Model evaluations (nfe) and likelihood                    #
#################################################################################

def test_nfe_of_fixed_step_and_adaptive_samplers():
    sampler = Sampler(create_transport())
    euler = sampler.sample_ode(sampling_method="euler", num_steps=9)
    model = CountingModel()
    euler(noise(), model)
    assert euler.nfe == model.calls == 8
    rk4 = sampler.sample_ode(sampling_method="rk4", num_steps=5)
    rk4(noise(), pull_to_origin)
    assert rk4.nfe == 4 * 4
    dopri5 = sampler.sample_ode(sampling_method="dopri5", num_steps=50)
    dopri5(noise(), pull_to_origin)
    # adaptive: num_steps only sets the output points; dopri5 needs 6 evaluations per step plus 2
    assert dopri5.nfe != 50 and (dopri5.nfe - 2) % 6 == 0


def test_sde_calls_the_model_once_per_drift_evaluation():
    """The original called the model twice per SDE drift (once for the velocity, once for the score)."""
    sampler = Sampler(create_transport("GVP", "score"))
    euler = sampler.sample_sde(sampling_method="Euler", num_steps=10)
    euler(noise(), pull_to_origin)
    assert euler.nfe == 9 + 1  # 9 steps and the Mean last step
    heun = sampler.sample_sde(sampling_method="Heun", num_steps=10, last_step="Tweedie")
    heun(noise(), pull_to_origin)
    assert heun.nfe == 2 * 9 + 1


@pytest.mark.parametrize("method,num_steps,expected", [("euler", 8, 7), ("rk4", 4, 12), ("dopri5", 4, None)])
def test_likelihood_calls_the_model_once_per_solver_evaluation(monkeypatch, method, num_steps, expected):
    """One drift (one model call) and one Rademacher probe of x's shape per solver evaluation; the
    original computed the drift twice."""
    probes = []
    real_randint = torch.randint

    def counting_randint(*args, **kwargs):
        probes.append(tuple(args[1]))
        return real_randint(*args, **kwargs)

    monkeypatch.setattr(torch, "randint", counting_randint)
    likelihood = Sampler(create_transport()).sample_ode_likelihood(sampling_method=method, num_steps=num_steps)
    x = noise()
    result = likelihood(x, pull_to_origin)
    assert likelihood.nfe == len(probes) and all(shape == tuple(x.shape) for shape in probes)
    if expected is not None:
        assert likelihood.nfe == expected
    assert isinstance(result, LikelihoodResult) and len(result) == 2


def test_bits_per_dim_and_prior_logp():
    transport = create_transport()
    z = noise()
    num_dims = z[0].numel()
    expected_prior = -0.5 * (z.flatten(1) ** 2).sum(1) - num_dims / 2 * math.log(2 * math.pi)
    torch.testing.assert_close(transport.prior_logp(z), expected_prior)
    logp = torch.tensor([-10.0, -20.0])
    result = LikelihoodResult(logp, torch.zeros(2, 3, 4))
    torch.testing.assert_close(result.bits_per_dim, torch.tensor([10.0, 20.0]) / (12 * math.log(2)))
    assert result.logp is logp and len(result) == 2


def test_likelihood_probe_options_are_checked():
    sampler = Sampler(create_transport())
    with pytest.raises(ValueError, match="num_probes"):
        sampler.sample_ode_likelihood(num_probes=0)
    with pytest.raises(ValueError, match="exact_trace"):
        sampler.sample_ode_likelihood(num_probes=4, exact_trace=True)


def test_default_likelihood_is_unchanged_by_the_new_options():
    """num_probes=1 draws the same probes as before: identical results under one seed."""
    sampler = Sampler(create_transport("GVP", "score"))
    x = noise()
    torch.manual_seed(3)
    default = sampler.sample_ode_likelihood(sampling_method="euler", num_steps=6)(x, pull_to_origin)
    torch.manual_seed(3)
    explicit = sampler.sample_ode_likelihood(sampling_method="euler", num_steps=6, num_probes=1,
                                             exact_trace=False)(x, pull_to_origin)
    assert torch.equal(default.logp, explicit.logp)


def test_exact_trace_of_a_linear_drift():
    """Velocity model -0.5 x on Linear: divergence -0.5 D exactly, so logp = prior(z) + 0.5 D."""
    x = noise()
    num_dims = x[0].numel()
    result = Sampler(create_transport()).sample_ode_likelihood(sampling_method="euler", num_steps=5,
                                                               exact_trace=True)(x, pull_to_origin)
    expected = create_transport().prior_logp(result.prior_sample) + 0.5 * num_dims
    torch.testing.assert_close(result.logp, expected, rtol=1e-6, atol=1e-4)


#################################################################################
#                              float64 and shapes                               #
#################################################################################

def test_float64_state_end_to_end():
    sampler = Sampler(create_transport("GVP", "noise"))
    x = noise(dtype=torch.float64)
    for sample_fn in (sampler.sample_ode(num_steps=3), sampler.sample_ode(sampling_method="heun3", num_steps=3),
                      sampler.sample_sde(num_steps=5), sampler.sample_sde(sampling_method="Heun", num_steps=5)):
        model = CountingModel()
        out = sample_fn(x, model)[-1]
        assert out.dtype == torch.float64 and model.dtypes == {torch.float64}
    model = CountingModel()
    result = sampler.sample_ode_likelihood(num_steps=3)(x, model)
    assert result.logp.dtype == result.prior_sample.dtype == torch.float64 and model.dtypes == {torch.float64}


def test_model_output_cast_to_the_state_dtype():
    def float32_model(x, t, **model_kwargs):
        return pull_to_origin(x, t).float()

    out = Sampler(create_transport()).sample_ode(num_steps=3)(noise(dtype=torch.float64), float32_model)[-1]
    assert out.dtype == torch.float64


def test_training_losses_shapes_and_wrong_model_output():
    transport = create_transport("VP", "noise", "likelihood")
    x1 = noise()
    terms = transport.training_losses(pull_to_origin, x1)
    assert terms["loss"].shape == (x1.shape[0],) and terms["pred"].shape == x1.shape

    def wrong_shape(x, t, **model_kwargs):
        return x[:, :1]

    with pytest.raises(ValueError, match="shape"):
        transport.training_losses(wrong_shape, x1)


def test_keep_trajectory_false_returns_only_the_sample():
    sampler = Sampler(create_transport())
    torch.manual_seed(0)
    full = sampler.sample_sde(num_steps=6)(noise(), pull_to_origin)
    torch.manual_seed(0)
    last = sampler.sample_sde(num_steps=6, keep_trajectory=False)(noise(), pull_to_origin)
    assert len(full) == 6 and len(last) == 1 and torch.equal(full[-1], last[0])
    ode_full = sampler.sample_ode(num_steps=4)(noise(), pull_to_origin)
    ode_last = sampler.sample_ode(num_steps=4, keep_trajectory=False)(noise(), pull_to_origin)
    assert ode_full.shape[0] == 4 and ode_last.shape[0] == 1 and torch.equal(ode_full[-1], ode_last[0])
