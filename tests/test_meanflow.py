"""MeanFlow (sit/training/meanflow.py, sit/sampling/meanflow.py): the objective's target against an
analytic model, its time draws, a training run through train.py that resumes bit-exact, the fine-tune
start from a velocity checkpoint, sample.py and sample_ddp.py with 1 and 2 steps computed by hand,
and the refusals, one line each."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import sample
import sample_ddp
import sit.generation
from conftest import make_image_folder
from models import SiT
from sit.errors import UsageError
from sit.generation import guided_sample
from sit.training.meanflow import ADAPTIVE_C, MSE, MeanFlowObjective, MeanFlowSettings, draw_times
from test_grid import PIXEL_MODEL, pixel_checkpoint
from test_train import assert_ok, load, logged_losses, only_experiment, plan_in_process, run_train
from transport import create_transport

TINY_PIXELS = ["--vae", "none", "--image-size", "8", "--num-classes", "2", "--model", "SiT-S/2", "--model-config",
               json.dumps({"depth": 1, "hidden_size": 32, "num_heads": 2, "learn_sigma": False})]


class AffineModel(nn.Module):
    """u(x, t, r) = a x + b t + c r: its d/dt along (v, 0, 1) is a v + b."""
    num_classes = 3
    config = {"class_dropout_prob": 0.0}

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Parameter(torch.tensor(value)) for value in (0.7, -0.3, 0.2))

    def forward(self, x, t, y, hidden_at=None, r=None):
        view = (-1, 1, 1, 1)
        return self.a * x + self.b * t.view(view) + self.c * r.view(view)


class LabeledAffineModel(AffineModel):
    """u(x, t, r, y) = a x + b t + c r + d y, trained with label dropout 0.5 (null label 3)."""
    config = {"class_dropout_prob": 0.5}

    def __init__(self):
        super().__init__()
        self.d = nn.Parameter(torch.tensor(0.4))

    def forward(self, x, t, y, hidden_at=None, r=None):
        return super().forward(x, t, y, r=r) + self.d * y.view(-1, 1, 1, 1)


def test_guidance_folded_into_training_replaces_v_for_the_samples_whose_label_is_kept():
    settings = MeanFlowSettings(objective="meanflow", meanflow_adaptive_p=0.0, meanflow_omega=0.5, meanflow_kappa=0.3)
    model = LabeledAffineModel()
    latents, labels = torch.randn(8, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    step = SimpleNamespace(model=model, ddp_model=model, transport=create_transport("Linear", "velocity"))
    torch.manual_seed(5)
    loss, _ = MeanFlowObjective(settings).losses(step, latents, labels)
    torch.manual_seed(5)
    t, r = draw_times(settings, 8, latents.device)
    noise = torch.randn_like(latents)
    dropped = torch.rand(8) < 0.5
    assert 0 < int(dropped.sum()) < 8
    y = torch.where(dropped, 3, labels)
    view = (-1, 1, 1, 1)
    x_t, v = t.view(view) * latents + (1 - t.view(view)) * noise, latents - noise
    with torch.no_grad():
        u_at_t = lambda y: model.a * x_t + (model.b + model.c) * t.view(view) + model.d * y.view(view)
        guided = 0.5 * v + 0.3 * u_at_t(labels) + 0.2 * u_at_t(torch.full_like(labels, 3))
        v = torch.where(dropped.view(view), v, guided)
        target = v - (t - r).view(view) * (model.a * v + model.b)
        u = model.a * x_t + model.b * t.view(view) + model.c * r.view(view) + model.d * y.view(view)
    torch.testing.assert_close(loss, (u - target).flatten(1).pow(2).sum(1))


@pytest.mark.parametrize("power", [1.0, 0.0])
def test_the_loss_is_the_adaptively_weighted_error_to_v_minus_t_minus_r_times_dudt(power):
    settings = MeanFlowSettings(objective="meanflow", meanflow_adaptive_p=power, meanflow_ratio=0.5)
    model, latents = AffineModel(), torch.randn(6, 3, 2, 2)
    step = SimpleNamespace(model=model, ddp_model=model, transport=create_transport("Linear", "velocity"))
    torch.manual_seed(3)
    loss, logged = MeanFlowObjective(settings).losses(step, latents, torch.zeros(6, dtype=torch.long))
    torch.manual_seed(3)  # the same draws by hand, in the objective's order: (t, r), noise, label drops
    t, r = draw_times(settings, 6, latents.device)
    noise = torch.randn_like(latents)
    view = (-1, 1, 1, 1)
    x_t, v = t.view(view) * latents + (1 - t.view(view)) * noise, latents - noise  # SiT's Linear path
    with torch.no_grad():
        a, b, c = model.a, model.b, model.c
        target = v - (t - r).view(view) * (a * v + b)
        squared = (a * x_t + b * t.view(view) + c * r.view(view) - target).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(loss, squared / (squared + ADAPTIVE_C) ** power)
    torch.testing.assert_close(logged[MSE], squared / 12)
    assert (r > t).sum() > 0 and (r == t).sum() > 0
    loss.mean().backward()  # the gradient flows through u only (the target is under stop-gradient)
    weights = 1 / (squared + ADAPTIVE_C) ** power
    error = (a * x_t + b * t.view(view) + c * r.view(view) - target).flatten(1)
    torch.testing.assert_close(model.a.grad, (weights * (2 * error * x_t.flatten(1)).sum(1)).mean().detach())


def test_times_are_logit_normal_in_meanflows_tau_with_r_at_or_after_t():
    settings = MeanFlowSettings(objective="meanflow")
    torch.manual_seed(0)
    t, r = draw_times(settings, 200_000, torch.device("cpu"))
    assert bool((r >= t).all()) and bool(((t > 0) & (r < 1)).all())
    assert abs(float((r != t).float().mean()) - 0.25) < 0.01  # --meanflow-ratio
    tau = torch.cat([1 - t, 1 - r[r != t]])  # every draw once: the pairs' larger tau and, where kept, the smaller
    normal = torch.logit(tau[: len(t)].double())
    assert float(normal.mean()) > -0.4  # the larger of two draws
    both = torch.logit(torch.cat([1 - t[r != t], 1 - r[r != t]]).double())
    assert abs(float(both.mean()) + 0.4) < 0.02 and abs(float(both.std()) - 1.0) < 0.02


def meanflow_checkpoint(path) -> str:
    """A train.py-shaped checkpoint of a tiny pixel MeanFlow SiT (random weights, r-embedder included)."""
    torch.manual_seed(1)
    model = SiT(**PIXEL_MODEL, mean_flow=True)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.05)
    state = model.state_dict()
    args = dict(model="SiT-S/2", image_size=4, num_classes=10, vae="none", path_type="Linear", prediction="velocity",
                loss_weight=None, train_eps=None, sample_eps=None, objective="meanflow")
    torch.save({"model": state, "ema": state, "opt": {}, "args": args, "model_config": model.config,
                "train_steps": 1}, path)
    return str(path)


@pytest.fixture
def recorded(monkeypatch) -> list:
    calls = []

    def recording(sample_fn, model, z, y, guidance, always_guide=False):
        samples = guided_sample(sample_fn, model, z, y, guidance, always_guide)
        calls.append(dict(model=model, z=z.clone(), y=y.clone(), samples=samples, nfe=sample_fn.nfe))
        return samples

    monkeypatch.setattr(sit.generation, "guided_sample", recording)
    return calls


def test_sample_py_one_step_is_z_plus_the_guided_average_velocity_over_the_whole_interval(tmp_path, recorded):
    ckpt = meanflow_checkpoint(tmp_path / "mf.pt")
    sample.main(["MeanFlow", "--ckpt", ckpt, "--num-sampling-steps", "1", "--class-labels", "1,2", "--cfg-scale", "2",
                 "--output", str(tmp_path / "grid.png")])
    (call,) = recorded
    z, y, model = torch.cat([call["z"]] * 2), torch.cat([call["y"], torch.full_like(call["y"], 10)]), call["model"]
    zeros, ones = torch.zeros(4), torch.ones(4)
    by_hand = z + model.forward_with_cfg(z, zeros, y, 2.0, r=ones)
    assert call["nfe"] == 1 and torch.equal(call["samples"], by_hand.chunk(2)[0])
    assert os.path.isfile(tmp_path / "grid.png")


def test_sample_ddp_two_steps_jump_to_the_middle_then_to_the_data_and_name_meanflow(tmp_path, recorded):
    ckpt = meanflow_checkpoint(tmp_path / "mf.pt")
    sample_dir = tmp_path / "samples"
    sample_ddp.main(["MeanFlow", "--ckpt", ckpt, "--sampling-method", "meanflow", "--num-sampling-steps", "2",
                     "--num-fid-samples", "3", "--per-proc-batch-size", "2", "--sample-dir", str(sample_dir)])
    for call in recorded:
        z, y, model = call["z"], call["y"], call["model"]
        half, full, zero = (torch.full((len(z),), value) for value in (0.5, 1.0, 0.0))
        middle = z + 0.5 * model.forward(z, zero, y, r=half)
        assert call["nfe"] == 2 and torch.equal(call["samples"], middle + 0.5 * model.forward(middle, half, y, r=full))
    (folder,) = [path for path in sample_dir.iterdir() if path.is_dir()]
    assert "-MeanFlow-meanflow-steps-2-" in folder.name
    record = json.loads((sample_dir / f"{folder.name}.json").read_text())
    assert (record["mode"], record["sampling_method"], record["num_sampling_steps"]) == ("MeanFlow", "meanflow", 2)


def test_samplers_refuse_the_other_kind_of_checkpoint_in_one_line(tmp_path):
    meanflow, velocity = meanflow_checkpoint(tmp_path / "mf.pt"), pixel_checkpoint(tmp_path / "v.pt")
    common = ["--num-fid-samples", "2", "--per-proc-batch-size", "2", "--sample-dir", str(tmp_path / "s")]
    for mode in ("ODE", "SDE"):
        with pytest.raises(UsageError, match=f"--ckpt is a MeanFlow model .*: sample it with mode MeanFlow .*not {mode}"):
            sample_ddp.main([mode, "--ckpt", meanflow, *common])
    with pytest.raises(UsageError, match="--sampling-method meanflow samples models trained with --objective "
                                         "meanflow; --ckpt is a velocity model: use mode ODE or SDE"):
        sample.main(["MeanFlow", "--ckpt", velocity, "--num-sampling-steps", "1", "--output", str(tmp_path / "g.png")])
    with pytest.raises(UsageError, match="--guide-ckpt guides velocity models"):
        sample_ddp.main(["MeanFlow", "--ckpt", meanflow, "--guide-ckpt", velocity, "--cfg-scale", "2", *common])
    with pytest.raises(UsageError, match="--num-sampling-steps must be at least 2, got 1"):
        sample_ddp.main(["ODE", "--ckpt", velocity, "--num-sampling-steps", "1", *common])


@pytest.fixture(scope="module")
def pixel_digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("meanflow")
    make_image_folder(str(root / "data"), num_classes=2, per_class=4, size=8)
    return root


def test_train_py_meanflow_step_and_resume_bit_exact(pixel_digits):
    root = pixel_digits
    common = ["--data-path", str(root / "data"), *TINY_PIXELS, "--objective", "meanflow", "--global-batch-size", "4",
              "--log-every", "1", "--num-workers", "0", "--ckpt-every", "2", "--sample-every", "100000"]
    straight = run_train([*common, "--results-dir", str(root / "straight"), "--max-steps", "4"], str(root))
    first = run_train([*common, "--results-dir", str(root / "parts"), "--max-steps", "2"], str(root))
    assert_ok(straight)
    assert_ok(first)
    resumed = run_train(["--data-path", str(root / "data"), "--results-dir", str(root / "parts"), "--resume",
                         "--max-steps", "4", "--log-every", "1", "--num-workers", "0", "--ckpt-every", "2",
                         "--sample-every", "100000"], str(root))
    assert_ok(resumed)
    straight_dir, parts_dir = only_experiment(root / "straight"), only_experiment(root / "parts")
    assert straight_dir.endswith("-meanflow")
    a, b = (load(os.path.join(folder, "checkpoints", "0000004.pt")) for folder in (straight_dir, parts_dir))
    assert a["args"]["objective"] == b["args"]["objective"] == "meanflow" and a["model_config"]["mean_flow"] is True
    assert any(name.startswith("r_embedder.") for name in a["model"])
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    losses = logged_losses(os.path.join(straight_dir, "log.txt"))
    assert losses == logged_losses(os.path.join(parts_dir, "log.txt")) and sorted(losses) == [1, 2, 3, 4]
    assert "MeanFlow MSE" in open(os.path.join(straight_dir, "log.txt")).read()
    # the r-embedder trains: its zero start moves once adaLN carries gradients to the conditioning (step 3)
    assert float(a["model"]["r_embedder.mlp.2.weight"].abs().max()) > 0


def test_fine_tuning_a_velocity_checkpoint_starts_equal_to_it_at_r_equal_t(tmp_path, pixel_digits):
    from sit.training.network import build_model

    train_ckpt = pixel_checkpoint(tmp_path / "train.pt")  # PIXEL_MODEL: 4 px, 10 classes, depth 1, width 32
    velocity_ckpt = str(tmp_path / "velocity.pt")  # its weights alone fine-tune (a train checkpoint resumes)
    torch.save(torch.load(train_ckpt, weights_only=True)["ema"], velocity_ckpt)
    common = ["--data-path", str(pixel_digits / "data"), "--vae", "none", "--image-size", "4",
              "--num-classes", "10", "--model", "SiT-S/2", "--model-config",
              json.dumps({"depth": 1, "hidden_size": 32, "num_heads": 2, "learn_sigma": False}),
              "--objective", "meanflow", "--results-dir", str(tmp_path / "r")]
    with pytest.raises(UsageError, match="the checkpoint is a velocity model's train checkpoint, which resumes"):
        plan_in_process([*common, "--ckpt", train_ckpt])
    plan = plan_in_process([*common, "--ckpt", velocity_ckpt])
    assert not plan.start.resuming
    meanflow = build_model(plan.config, plan.start).eval()
    velocity = SiT(**PIXEL_MODEL).eval()
    velocity.load_state_dict(torch.load(velocity_ckpt, weights_only=True))
    assert meanflow.config["mean_flow"] is True
    torch.manual_seed(0)
    x, t, y = torch.randn(3, 3, 4, 4), torch.rand(3), torch.tensor([0, 4, 9])
    with torch.no_grad():
        expected = velocity(x, t, y)
        assert torch.equal(meanflow(x, t, y, r=t), expected)
        assert torch.equal(meanflow(x, t, y, r=torch.ones(3)), expected)  # the r-embedder starts at zero


def bad_train_args(pixel_digits, tmp_path, *more):
    return ["--data-path", str(pixel_digits / "data"), *TINY_PIXELS, "--results-dir", str(tmp_path / "r"), *more]


@pytest.mark.parametrize("more, message", [
    (["--objective", "meanflow", "--meanflow-kappa", "1.0"], "--meanflow-kappa must be in [0, 1), got 1.0"),
    (["--objective", "meanflow", "--meanflow-adaptive-p", "-1"], "--meanflow-adaptive-p must be >= 0, got -1.0"),
    (["--meanflow-ratio", "0.5"], "--meanflow-ratio is read only with --objective meanflow"),
    (["--objective", "meanflow", "--prediction", "noise"], "--objective meanflow learns an average velocity: use "
                                                           "--prediction velocity"),
    (["--objective", "meanflow", "--time-sampling", "logit-normal"], "--time-sampling/--time-shift place"),
    (["--objective", "meanflow", "--image-size", "5"], "--image-size 5 gives 5x5 pixels, not divisible by the patch "
                                                       "size 2"),
])
def test_bad_meanflow_settings_are_one_line(pixel_digits, tmp_path, more, message):
    with pytest.raises(UsageError) as error:
        plan_in_process(bad_train_args(pixel_digits, tmp_path, *more))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("flag, value", [("--meanflow-omega", "0"), ("--meanflow-ratio", "1.5"),
                                         ("--objective", "consistency")])
def test_bad_meanflow_values_are_argparse_errors(pixel_digits, tmp_path, flag, value, capsys):
    with pytest.raises(SystemExit) as exited:
        plan_in_process(bad_train_args(pixel_digits, tmp_path, "--objective", "meanflow", flag, value))
    assert exited.value.code == 2 and flag in capsys.readouterr().err


def test_fid_while_training_and_previews_sample_a_meanflow_run_with_its_jumps(tmp_path, recorded, monkeypatch):
    import sit.training.preview as preview
    from sit.distributed import DistContext
    from sit.training.fid import measure_fid

    torch.manual_seed(2)
    model = SiT(**PIXEL_MODEL, mean_flow=True).eval()
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.05)
    images = []
    monitor = SimpleNamespace(update=images.append, compute=lambda: 0.0, reset=lambda: None)
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    measure_fid(model, None, create_transport(), monitor, ctx, num_images=3, batch_size=3, num_steps=1, cfg_scale=1.0,
                global_seed=0, precision="fp32")
    (call,) = recorded
    z, y, n = call["z"], call["y"], len(call["z"])
    assert call["nfe"] == 1
    assert torch.equal(call["samples"], z + model(z, torch.zeros(n), y, r=torch.ones(n)))
    monkeypatch.setattr(preview, "guided_sample", sit.generation.guided_sample)  # the recording one
    preview.save_preview(model, None, create_transport(), preview.preview_inputs(0, model.config), 1.0,
                         str(tmp_path / "preview.png"), torch.device("cpu"))
    assert recorded[-1]["nfe"] == 2 and os.path.isfile(tmp_path / "preview.png")
