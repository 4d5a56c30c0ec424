"""sit.sampling.presets and sample_ddp.py --preset: the exact flags each preset fills, explicit flags
overriding with a warning, --preset list, unknown presets and modes in one line, and the mapping of
REPA's sampler onto this code's flags."""
import numpy as np
import pytest
import torch

import sample_ddp
from models import _interval_scale
from sit.cli import parse_with_explicit, run_main
from sit.config import GuidanceConfig, ODEConfig, SDEConfig, TransportConfig
from sit.errors import UsageError
from sit.sampling.meanflow import MeanFlowConfig
from sit.sampling.presets import PRESETS, apply_preset, preset_names, preset_table, requested_preset, with_preset_mode
from transport.integrators import SDESolver

ODE_PRESET, SDE_PRESET, REPA_PRESET = "sit-xl2-256-ode-cfg1.5", "sit-xl2-256-sde", "repa-xl2-256-sde-cfg1.8-interval"
ODE_512_PRESET = "sit-xl2-512-ode-cfg1.5"
MEANFLOW_PRESETS = ("meanflow-xl2-256-1step", "meanflow-xl2-256-2step")
SDE_250 = SDEConfig(sampling_method="Euler", num_steps=250, diffusion_form="sigma", diffusion_norm=1.0,
                    last_step="Mean", last_step_size=0.04)
EXPECTED = {  # preset -> (sampler, guidance) of its SamplingConfig
    ODE_PRESET: (ODEConfig(sampling_method="heun2", num_steps=125, atol=1e-6, rtol=1e-3, reverse=False),
                 GuidanceConfig(scale=1.5, all_channels=False, interval=(0.0, 1.0))),
    SDE_PRESET: (SDE_250, GuidanceConfig(scale=1.0, all_channels=False, interval=(0.0, 1.0))),
    REPA_PRESET: (SDE_250, GuidanceConfig(scale=1.8, all_channels=True, interval=(0.3, 1.0))),
    ODE_512_PRESET: (ODEConfig(sampling_method="heun2", num_steps=125, atol=1e-6, rtol=1e-3, reverse=False),
                     GuidanceConfig(scale=1.5, all_channels=False, interval=(0.0, 1.0))),
    **{name: (MeanFlowConfig(num_steps=steps), GuidanceConfig(scale=1.0, all_channels=False, interval=(0.0, 1.0)))
       for name, steps in zip(MEANFLOW_PRESETS, (1, 2))},
}


def test_the_presets_are_the_published_ones():
    assert list(PRESETS) == [ODE_PRESET, SDE_PRESET, REPA_PRESET, ODE_512_PRESET, *MEANFLOW_PRESETS]
    assert preset_names() == [*PRESETS, "list"]
    assert "2.06" in PRESETS[ODE_PRESET].published and "issue #18" in PRESETS[ODE_PRESET].source
    assert "8.3" in PRESETS[SDE_PRESET].published and "not verified" in PRESETS[SDE_PRESET].note
    assert "1.42" in PRESETS[REPA_PRESET].published and "sihyun-yu/REPA" in PRESETS[REPA_PRESET].source
    assert "2.62" in PRESETS[ODE_512_PRESET].published and "not published" in PRESETS[ODE_512_PRESET].note
    assert ["3.43" in PRESETS[MEANFLOW_PRESETS[0]].published, "2.20" in PRESETS[MEANFLOW_PRESETS[1]].published] == [True] * 2


@pytest.mark.parametrize("name", list(EXPECTED))
def test_a_preset_fills_its_exact_flags_before_the_config_is_built(name):
    args, config, preset = sample_ddp.parse_command_line(["--preset", name])  # the mode comes from the preset
    sampler, guidance = EXPECTED[name]
    assert config.sampler == sampler and config.guidance == guidance
    image_size = 512 if name == ODE_512_PRESET else 256
    assert (config.request.model_name, config.request.image_size, config.request.vae) == ("SiT-XL/2", image_size, "ema")
    assert config.num_images == 50_000 and config.request.ckpt is None
    assert config.precision == "tf32" and config.seed == 0 and config.batch_size == 4  # not the preset's to set
    assert preset.filled == tuple(" ".join((flag, *values)) for flag, values in PRESETS[name].flags)
    assert preset.overridden == ()
    # the Namespace stays as parsed: the script's own defaults
    assert args.mode == PRESETS[name].mode and args.cfg_scale == 1.0 and args.model is None
    assert args.num_sampling_steps == 250 and args.guide_all_channels is False
    # the same preset given with its mode first gives the same configuration
    assert sample_ddp.parse_command_line([PRESETS[name].mode, "--preset", name])[1] == config


def test_the_preset_is_one_log_line_before_sampling():
    _, _, preset = sample_ddp.parse_command_line(["--preset", ODE_PRESET, "--ckpt", "mine.pt"])
    assert preset.summary() == (
        f"Preset {ODE_PRESET} filled: --model SiT-XL/2 --image-size 256 --vae ema --num-fid-samples 50000 "
        f"--sampling-method heun2 --num-sampling-steps 125 --cfg-scale 1.5 [published: {PRESETS[ODE_PRESET].published}]")
    assert "\n" not in preset.summary() and preset.warnings() == []


def test_explicit_flags_override_the_preset_with_a_warning_naming_each():
    _, config, preset = sample_ddp.parse_command_line(
        ["SDE", "--preset", REPA_PRESET, "--cfg-scale", "4", "--cfg-interval", "0.5", "1", "--num-fid-samples", "8",
         "--num-sampling-steps", "250", "--model", "SiT-B/2"])  # --num-sampling-steps equals the preset's: no warning
    assert config.guidance == GuidanceConfig(scale=4.0, all_channels=True, interval=(0.5, 1.0))
    assert config.sampler == SDE_250 and config.num_images == 8 and config.request.model_name == "SiT-B/2"
    assert preset.warnings() == [
        f"--preset {REPA_PRESET}: explicit --model SiT-B/2 (the preset's: --model SiT-XL/2) overrides the preset",
        f"--preset {REPA_PRESET}: explicit --num-fid-samples 8 (the preset's: --num-fid-samples 50000) overrides "
        f"the preset",
        f"--preset {REPA_PRESET}: explicit --cfg-scale 4.0 (the preset's: --cfg-scale 1.8) overrides the preset",
        f"--preset {REPA_PRESET}: explicit --cfg-interval 0.5 1.0 (the preset's: --cfg-interval 0.3 1.0) overrides "
        f"the preset",
    ]
    assert "--num-sampling-steps 250" not in preset.filled  # given explicitly: neither filled nor overridden


def test_apply_preset_leaves_the_flags_it_is_given_unchanged():
    args, given = parse_with_explicit(lambda: sample_ddp.build_parser("ODE"), ["ODE", "--cfg-scale", "2"])
    flags = vars(args).copy()
    use = apply_preset(ODE_PRESET, flags, given, lambda: sample_ddp.build_parser("ODE"))
    assert flags == vars(args) and use.flags["cfg_scale"] == 2.0 and use.flags["sampling_method"] == "heun2"
    assert use.given == given | {"model", "image_size", "vae", "num_fid_samples", "sampling_method",
                                 "num_sampling_steps"}


def test_preset_list_prints_every_preset_with_its_numbers_and_sources(capsys):
    for argv in (["--preset", "list"], ["ODE", "--preset", "list"], ["--preset=list"]):
        sample_ddp.main(argv)  # returns: exit 0, nothing sampled
        out = capsys.readouterr().out
        assert out == preset_table() + "\n"
        for preset in PRESETS.values():
            assert f"{preset.name}  ({preset.mode})" in out
            assert f"    flags:     {' '.join(preset.argv())}" in out
            assert f"    published: {preset.published}" in out and f"    source:    {preset.source}" in out
    assert run_main(lambda: sample_ddp.main(["--preset", "list"]), "sample_ddp.py") == 0


def test_an_unknown_preset_is_one_line_listing_the_valid_ones(capsys):
    message = f"--preset 'sit-xl' does not exist; choose one of {', '.join(preset_names())}"
    with pytest.raises(UsageError) as raised:
        sample_ddp.parse_command_line(["ODE", "--preset", "sit-xl"])
    assert str(raised.value) == message
    assert run_main(lambda: sample_ddp.main(["--preset", "sit-xl"]), "sample_ddp.py") == 2
    assert capsys.readouterr().err == f"sample_ddp.py: error: {message}\n"
    assert requested_preset(["ODE", "--cfg-scale", "2"]) is None


def test_a_preset_of_the_other_mode_is_one_line():
    with pytest.raises(UsageError) as raised:
        sample_ddp.parse_command_line(["ODE", "--preset", SDE_PRESET])
    assert str(raised.value) == (f"--preset {SDE_PRESET} is an SDE evaluation but the mode given is ODE: run "
                                 f"`SDE --preset {SDE_PRESET}` (or leave the mode out; the preset sets it)")
    assert with_preset_mode(["--cfg-scale", "2", "--preset", ODE_PRESET], ODE_PRESET)[0] == "ODE"
    assert with_preset_mode(["-h"], ODE_PRESET) == ["-h"]


def test_every_preset_is_valid_for_the_scripts_parser():
    for preset in PRESETS.values():
        args, given = parse_with_explicit(lambda: sample_ddp.build_parser(preset.mode), preset.argv())
        assert given == {"mode"} | {flag[2:].replace("-", "_") for flag, _ in preset.flags}


def test_repa_guidance_interval_maps_onto_the_same_steps_of_the_same_grid():
    """REPA's Euler-Maruyama runs its time from 1 (noise) to 0.04 on 250 points, then a mean step to 0, and
    guides where its t <= 0.7; this code's SDE runs t = 0 -> 0.96 (same 250 points), then a mean step of 0.04,
    and --cfg-interval 0.3 1.0 guides the same steps."""
    transport = TransportConfig().build()
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, diffusion_form="sigma", sde=True,
                                      eval=True, last_step_size=0.04)
    ours = SDESolver(None, None, t0=t0, t1=t1, num_steps=250, sampler_type="Euler").grid(torch.float64)
    repa = torch.linspace(1.0, 0.04, 250, dtype=torch.float64)
    np.testing.assert_allclose(ours.numpy(), (1 - repa).numpy(), atol=1e-12)
    guided_here = _interval_scale(ours, 1.8, (0.3, 1.0), 1) == 1.8  # the model is called at each of the 250 points
    guided_repa = repa <= 0.7  # (the last, at 0.96 here and 0.04 there, by the mean step)
    assert torch.equal(guided_here, guided_repa) and 0 < int(guided_here.sum()) < 250
    # its diffusion 2t (its time) is 2 w(t) with w = sigma_t = 1 - t here: --diffusion-form sigma
    sigma = transport.path_sampler.compute_diffusion(torch.zeros(250, 1), ours, form="sigma", norm=1.0)
    np.testing.assert_allclose((2 * sigma).flatten().numpy(), (2 * repa).numpy(), atol=1e-12)


def test_an_error_about_a_flag_the_preset_filled_says_the_preset_set_it(tmp_path, capsys):
    from test_download import random_sit, train_checkpoint
    ckpt = tmp_path / "tiny.pt"
    torch.save(train_checkpoint(random_sit(), random_sit(seed=1)), ckpt)  # a custom model at 64 px
    code = run_main(lambda: sample_ddp.main(["--preset", SDE_PRESET, "--ckpt", str(ckpt), "--image-size", "64",
                                             "--sample-dir", str(tmp_path / "samples")]), "sample_ddp.py")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--model SiT-XL/2" in line
    assert line.endswith(f"(--model: filled by --preset {SDE_PRESET}, not typed; give it explicitly to override)")
    assert "--image-size" not in line.split("(--model:")[1]  # typed by the user: not blamed on the preset
