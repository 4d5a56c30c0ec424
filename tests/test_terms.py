"""sit/training/terms.py: a loss term written in this file alone (registered by a monkeypatch of the
registry's table of features, no edit anywhere else) trains through train.py's real step, resumes bit-exact and
survives a rollback."""
import os

import numpy as np
import pytest
import torch
from torch import nn

import train
from conftest import write_cached_latents
from sit.data.order import ResumableDistributedSampler
from sit.training.extensions import Feature
from sit.training.registry import FEATURES
from sit.training.terms import LossTerm, ModelWithTerms, StepView
from test_train import TINY, load, only_experiment

NUM_LATENTS, BATCH = 16, 2
NAN_BATCH = (0, 3)  # the data of step 4


class ToyTerm(LossTerm):
    """A learnt gain on the model output pulled toward the velocity target, and a head on block 1."""
    name = "toy"
    block = 1
    weight = 0.3

    def __init__(self, width: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.probe = nn.Linear(width, 1)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.probe(hidden).squeeze(-1)  # (N, T, D) -> (N, T)

    def losses(self, view: StepView) -> dict:
        matched = ((self.gain * view.output - view.target) ** 2).flatten(1).mean(1)  # (N,)
        return {"Toy Loss": matched, "Probe Loss": view.head.pow(2).mean(1)}


class FastToy(LossTerm):
    """A term with AdamW options of its own: its parameter lives in a group of its own, at its own lr."""
    name = "fast"
    optimizer_options = {"lr": 1e-2}

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(()))

    def losses(self, view: StepView) -> dict:
        return {"Fast Loss": (view.output.flatten(1).mean(1) - self.offset) ** 2}


def write_features(path: str, nan_at=None) -> str:
    """NUM_LATENTS cached latents; with nan_at=(epoch, batch) the first latent of that batch is NaN."""

    def corrupt(mean: np.ndarray) -> None:
        sampler = ResumableDistributedSampler(range(NUM_LATENTS), num_replicas=1, rank=0, shuffle=True, seed=0)
        sampler.set_epoch(nan_at[0])
        mean[list(sampler)[nan_at[1] * BATCH]] = np.nan

    return write_cached_latents(path, NUM_LATENTS, corrupt if nan_at is not None else None)


@pytest.fixture
def toy_registered(monkeypatch):
    fast = Feature("fast", term=lambda settings, context: lambda sit: FastToy())
    toy = Feature("toy", term=lambda settings, context: lambda sit: ToyTerm(sit.config["hidden_size"]))
    monkeypatch.setitem(FEATURES, "fast", fast)  # registered first, held by AdamW after the toy term
    monkeypatch.setitem(FEATURES, "toy", toy)


def run(features: str, results: str, *more: str) -> None:
    train.main(["--feature-path", features, *TINY, "--results-dir", results, "--global-batch-size", str(BATCH),
                "--log-every", "1", "--ckpt-every", "100000", "--sample-every", "100000", "--num-workers", "0", *more])


def final_checkpoint(results: str, step: int) -> dict:
    return load(os.path.join(only_experiment(results), "checkpoints", f"{step:07d}.pt"))


def assert_same_state(first: dict, second: dict) -> None:
    for key in ("model", "ema"):
        for name, tensor in first[key].items():
            assert torch.equal(tensor, second[key][name]), f"{key}.{name} differs"
    assert first["extras"]["toy"].keys() == second["extras"]["toy"].keys() == {"gain", "probe.weight", "probe.bias"}
    assert list(first["extras"]) == ["toy", "fast"]  # AdamW's order: the SiT's group, then groups of their own
    for term in ("toy", "fast"):
        for name, tensor in first["extras"][term].items():
            assert torch.equal(tensor, second["extras"][term][name]), f"the {term} term's {name} differs"
    for index, state in first["opt"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, second["opt"]["state"][index][name]), f"opt state {index}.{name} differs"


def test_the_step_adds_weight_times_each_term_and_its_parameters_learn(toy_registered, tmp_path):
    features = write_features(str(tmp_path / "features"))
    run(features, str(tmp_path / "results"), "--max-steps", "3")
    saved = final_checkpoint(str(tmp_path / "results"), 3)
    assert saved["extras"]["toy"]["gain"].item() != 1.0  # trained
    assert not torch.equal(saved["extras"]["toy"]["probe.weight"], ToyTerm(32).probe.weight * 0)  # stored
    # AdamW holds the SiT's parameters and the toy term's (3) in one group, the fast term's in its own
    assert len(saved["opt"]["state"]) == len(saved["model"]) - 1 + 3 + 1  # pos_embed is frozen: no state
    groups = saved["opt"]["param_groups"]
    assert [group["lr"] for group in groups] == [1e-4, 1e-2] and len(groups[1]["params"]) == 1
    assert saved["extras"]["fast"]["offset"].item() != 0.0
    with open(os.path.join(only_experiment(str(tmp_path / "results")), "log.txt")) as handle:
        lines = [line for line in handle if "Train Loss" in line and "(first step" not in line]
    assert len(lines) == 3 and all("Toy Loss: " in line and "Probe Loss: " in line and "Fast Loss: " in line
                                   for line in lines)


def test_the_loss_is_the_transport_loss_plus_weighted_terms():
    from sit.training.step import TrainStep, losses_with_terms
    from models import SiT
    from transport import create_transport

    torch.manual_seed(0)
    model = SiT(input_size=4, in_channels=4, num_classes=2, depth=2, hidden_size=32, num_heads=2)
    term = ToyTerm(32)
    step = TrainStep.create(model, transport=create_transport(), device=torch.device("cpu"), lr=1e-4, terms=[term])
    assert isinstance(step.ddp_model, ModelWithTerms)
    x1, labels = torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 0])
    torch.manual_seed(5)
    loss, total, named = losses_with_terms(step, x1, labels, [None])
    torch.manual_seed(5)
    plain = step.transport.training_losses(model, x1, dict(y=labels))
    assert torch.equal(loss, plain["loss"].mean())
    by_hand = ((term.gain * plain["pred"] - plain["target"]) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(named["Toy Loss"], by_hand)
    torch.testing.assert_close(total, loss + 0.3 * (named["Toy Loss"] + named["Probe Loss"]))


@pytest.mark.slow
def test_a_toy_term_resumes_bit_exact(toy_registered, tmp_path):
    features = write_features(str(tmp_path / "features"))
    run(features, str(tmp_path / "straight"), "--max-steps", "6")
    run(features, str(tmp_path / "interrupted"), "--max-steps", "4", "--ckpt-every", "4")
    train.main(["--resume", only_experiment(str(tmp_path / "interrupted")), "--feature-path", features,
                "--max-steps", "6", "--num-workers", "0",
                "--ckpt-every", "100000", "--sample-every", "100000"])
    assert_same_state(final_checkpoint(str(tmp_path / "straight"), 6), final_checkpoint(str(tmp_path / "interrupted"), 6))


@pytest.mark.slow
def test_a_toy_term_survives_a_rollback(toy_registered, tmp_path):
    """A NaN batch rolls the run back (term included) and skips it: the end equals a run told to skip it."""
    features = write_features(str(tmp_path / "features"), nan_at=NAN_BATCH)
    run(features, str(tmp_path / "healed"), "--max-steps", "6", "--max-rollbacks", "1", "--rollback-every", "2")
    run(features, str(tmp_path / "told"), "--max-steps", "6", "--skip-batches", f"{NAN_BATCH[0]}:{NAN_BATCH[1]}")
    healed, told = final_checkpoint(str(tmp_path / "healed"), 6), final_checkpoint(str(tmp_path / "told"), 6)
    assert healed["healing"]["rollbacks"][0]["skipped_batch"] == list(NAN_BATCH)
    assert_same_state(healed, told)


def test_a_term_with_parameters_says_why_it_cannot_be_sharded():
    """build_train_step turns a refusal into one line naming --sharding fsdp (terms without parameters run sharded)."""
    assert ToyTerm(8).sharding_refusal() == "the toy term's parameters are not sharded"

    class Stateless(LossTerm):
        name = "stateless"

    assert Stateless().sharding_refusal() is None
