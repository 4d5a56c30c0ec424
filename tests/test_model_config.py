"""models.ModelConfig: SiT's hyperparameters declared once (type, default, bounds), what checkpoints store,
what --model-config accepts, and the parameter count computed on the meta device."""
import dataclasses
import inspect
import json

import pytest
import torch

import models
from models import ModelConfig
from sit.errors import UsageError
from sit.training.settings import MODEL_CONFIG_KEYS, parse_model_config

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=2)
# what train.py stored for a tiny pixel-space run before ModelConfig existed (same keys, order and value types)
STORED = {"input_size": 8, "patch_size": 2, "in_channels": 3, "hidden_size": 32, "depth": 1, "num_heads": 2,
          "mlp_ratio": 4.0, "class_dropout_prob": 0.1, "num_classes": 2, "learn_sigma": True}


def test_the_fields_are_sits_arguments_with_the_same_defaults():
    signature = inspect.signature(models.SiT).parameters
    assert list(signature) == [spec.name for spec in dataclasses.fields(ModelConfig)]
    assert {name: parameter.default for name, parameter in signature.items()} == {
        spec.name: spec.default for spec in dataclasses.fields(ModelConfig)}


def test_block_options_are_stored_only_when_set():
    # the block options (stored_if_set) leave a config without them stored as before; one that is on is stored
    before = {**STORED, **added_fields()}
    assert list(ModelConfig().to_dict()) == list(before) and not {"rope", "qk_norm"} & set(before)
    stored = models.SiT(**TINY, rope=True, qk_norm=True).config
    assert stored == {**before, "rope": True, "qk_norm": True} and list(stored)[-2:] == ["rope", "qk_norm"]
    assert ModelConfig.from_dict(stored).to_dict() == stored


def added_fields() -> dict:
    """The fields added since STORED that every config stores, at their defaults, after the original's keys
    (none today: the newer options are stored only when set)."""
    return {key: value for key, value in ModelConfig().to_dict().items() if key not in STORED}


def test_to_dict_is_what_checkpoints_store():
    added = added_fields()
    model = models.SiT(**TINY)
    assert model.config == {**STORED, **added} and list(model.config) == list(STORED) + list(added)
    assert ModelConfig.from_dict(STORED).to_dict() == {**STORED, **added}
    assert list(ModelConfig.from_dict(STORED).to_dict()) == list(STORED) + list(added)


def test_values_keep_their_type_so_that_files_stay_the_same():
    # --model-config '{"mlp_ratio": 2, "class_dropout_prob": 0}' was stored as ints: it still is
    stored = ModelConfig.from_dict(dict(STORED, mlp_ratio=2, class_dropout_prob=0)).to_dict()
    assert type(stored["mlp_ratio"]) is int and type(stored["class_dropout_prob"]) is int


def test_an_old_stored_config_without_a_field_loads_with_its_default():
    older = {key: value for key, value in STORED.items() if key not in ("mlp_ratio", "learn_sigma")}
    config = ModelConfig.from_dict(older)
    assert config.mlp_ratio == ModelConfig.mlp_ratio == 4.0 and config.learn_sigma is True
    assert config.to_dict() == {**STORED, **added_fields()}
    assert ModelConfig.from_dict({}) == ModelConfig()


@pytest.mark.parametrize("change, message", [
    ({"depth": 0}, "the model config's depth 0 is outside [1, 1024]"),
    ({"hidden_size": 65537}, "the model config's hidden_size 65537 is outside [1, 65536]"),
    ({"class_dropout_prob": 1.0}, "the model config's class_dropout_prob 1.0 is outside [0, 1)"),
    ({"mlp_ratio": float("inf")}, "the model config's mlp_ratio inf is outside [0.001, 64]"),
    ({"depth": 10 ** 400}, "the model config's depth 1000"),  # past float range: out of bounds, no OverflowError
    ({"depth": True}, "the model config's depth must be an integer, got True"),
    ({"depth": 2.0}, "the model config's depth must be an integer, got 2.0"),
    ({"mlp_ratio": "4"}, "the model config's mlp_ratio must be a number, got '4'"),
    ({"learn_sigma": 1}, "the model config's learn_sigma must be true or false, got 1"),
    ({"widht": 32}, "the model config has unknown key(s) widht (valid: input_size, patch_size, "),
    ({"input_size": 9}, "the model config's input_size 9 is not divisible by patch_size 2"),
    ({"num_heads": 3}, "the model config's hidden_size 32 is not divisible by num_heads 3"),
    ({"rope": 1}, "the model config's rope must be true or false, got 1"),
    ({"rope": True, "hidden_size": 24, "num_heads": 4},
     "the model config's rope needs a head size (hidden_size / num_heads) divisible by 4 to cover the patch grid's "
     "rows and columns, got 24 / 4 = 6"),
])
def test_bad_values_are_refused_naming_the_key(change, message):
    problem = ModelConfig.problem_of({**STORED, **change})
    assert problem.startswith(message) and "\n" not in problem
    with pytest.raises(ValueError) as error:
        ModelConfig.from_dict({**STORED, **change})
    assert str(error.value) == problem


def test_a_config_that_is_no_dict_is_refused():
    assert ModelConfig.problem_of([1, 2]) == "the model config is a list, not a dict"
    assert ModelConfig.problem_of(STORED) is None


def test_ints_are_numbers_but_bools_are_not():
    assert ModelConfig.value_problem("mlp_ratio", 2) is None
    assert ModelConfig.value_problem("class_dropout_prob", 0) is None
    assert ModelConfig.value_problem("mlp_ratio", False) == "mlp_ratio must be a number, got False"


@pytest.mark.parametrize("config", [
    TINY,
    dict(TINY, learn_sigma=False),
    dict(TINY, class_dropout_prob=0.0),
    dict(TINY, learn_sigma=False, class_dropout_prob=0.0, mlp_ratio=2.5),
    dict(input_size=16, patch_size=4, in_channels=4, hidden_size=48, depth=3, num_heads=3, mlp_ratio=0.5, num_classes=7),
    dict(input_size=12, patch_size=3, in_channels=1, hidden_size=36, depth=2, num_heads=6, num_classes=1),
    dict(TINY, rope=True, swiglu=True, rms_norm=True, qk_norm=True),
    dict(TINY, swiglu=True, mlp_ratio=2.5),
    dict(TINY, qk_norm=True),  # LayerNorm with affine per head
])
def test_parameter_count_is_that_of_a_real_sit(config):
    built = models.SiT(**config)
    assert ModelConfig.from_dict(config).parameter_count() == sum(parameter.numel() for parameter in built.parameters())


def test_parameter_count_of_published_models_allocates_nothing():
    # SiT-XL/2 at 256x256: 675M parameters (the paper's count, pos_embed included)
    assert ModelConfig().parameter_count() == 675_129_632
    with torch.device("meta"):
        built = models.SiT_models["SiT-B/4"](input_size=64)
    assert ModelConfig.from_dict(built.config).parameter_count() == sum(parameter.numel() for parameter in built.parameters())


def test_model_config_flag_keys_are_the_networks_not_the_datas():
    assert MODEL_CONFIG_KEYS == ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
                                 "class_dropout_prob", "learn_sigma", "mean_flow", "rope", "swiglu", "rms_norm",
                                 "qk_norm")
    assert set(ModelConfig().to_dict()) - set(MODEL_CONFIG_KEYS) == {"input_size", "in_channels", "num_classes"}


@pytest.mark.parametrize("overrides, message", [
    ({"depth": 0}, "--model-config: depth must be an integer in [1, 1024], got 0"),
    ({"depth": "2"}, '--model-config: depth must be an integer in [1, 1024], got "2"'),
    ({"class_dropout_prob": 1.5}, "--model-config: class_dropout_prob must be a number in [0, 1), got 1.5"),
    ({"learn_sigma": 1}, "--model-config: learn_sigma must be true or false, got 1"),
    ({"num_classes": 3}, "--model-config: unknown key(s) num_classes; valid: patch_size, hidden_size, "),
])
def test_the_model_config_flag_uses_the_same_bounds(overrides, message):
    with pytest.raises(UsageError) as error:
        parse_model_config(json.dumps(overrides))
    assert str(error.value).startswith(message)


def test_the_model_config_flag_accepts_what_a_checkpoint_may_hold():
    overrides = {"depth": 2, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2, "class_dropout_prob": 0,
                 "learn_sigma": False, "patch_size": 4}
    assert parse_model_config(json.dumps(overrides)) == overrides
    assert parse_model_config(None) == {}


# "Add a model option" (docs/ARCHITECTURE.md): a new field of ModelConfig needs a value here that differs
# from its default; the test below then carries it through train.py, the checkpoint and load_model.
OTHER_VALUES = {"patch_size": 4, "hidden_size": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0,
                "class_dropout_prob": 0.2, "learn_sigma": False, "mean_flow": True, "rope": True, "swiglu": True,
                "rms_norm": True, "qk_norm": True}


def test_every_network_option_has_a_value_for_the_round_trip_below():
    assert set(OTHER_VALUES) == set(MODEL_CONFIG_KEYS)
    defaults = {spec.name: spec.default for spec in dataclasses.fields(ModelConfig)}
    assert all(OTHER_VALUES[key] != defaults[key] and ModelConfig.value_problem(key, value) is None
               for key, value in OTHER_VALUES.items())


@pytest.mark.slow
def test_every_network_option_goes_through_train_py_the_checkpoint_and_load_model(tmp_path):
    """The recipe's promise: a field of ModelConfig is a --model-config key, stored in train.py's checkpoint,
    and rebuilt by load_model (sample.py's loader) without any other edit."""
    import os

    import train
    from conftest import make_image_folder
    from sit.checkpoint import load_model

    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=16)
    train.main(["--data-path", data, "--vae", "none", "--image-size", "16", "--num-classes", "2",
                "--model-config", json.dumps(OTHER_VALUES), "--results-dir", str(tmp_path / "results"),
                "--global-batch-size", "2", "--max-steps", "1", "--num-workers", "0", "--sample-every", "100"])
    (experiment,) = os.listdir(tmp_path / "results")
    path = os.path.join(tmp_path / "results", experiment, "checkpoints", "0000001.pt")
    stored = torch.load(path, weights_only=True)["model_config"]
    assert {key: stored[key] for key in OTHER_VALUES} == OTHER_VALUES
    model, info = load_model(path)
    assert {key: model.config[key] for key in OTHER_VALUES} == OTHER_VALUES and info["num_classes"] == 2
