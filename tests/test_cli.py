"""sit/cli.py: every flag of every script says what it does and, where it has one, its default."""
import argparse
import importlib
import inspect
import os
from typing import Optional

import pytest

from conftest import REPO
from sit.cli import DefaultsInHelp

SCRIPTS = {"train": [], "sample": ["ODE"], "sample_ddp": ["SDE"], "extract_features": [], "evaluate": [],
           "reconstruct_ema": [], "export_digits": [], "plot_metrics": [], "make_reference": []}
BENCHMARKS = ["bench", "device_check", "kill_resume", "latent_stats_digits", "lightningdit_digits", "meanflow_digits",
              "memory", "repa_digits"]  # benchmarks/*.py with flags


class Captured(Exception):
    """Raised by the patched parse_args with the parser a script built."""


def script_parser(name: str, monkeypatch, argv: Optional[list] = None) -> argparse.ArgumentParser:
    """The parser a script's main builds for argv (default: SCRIPTS[name]; its parse_args is stopped before
    it reads the command line)."""
    def capture(parser, args=None, namespace=None):
        raise Captured(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = importlib.import_module(name)
    with pytest.raises(Captured) as captured:
        if inspect.signature(module.main).parameters:
            module.main(SCRIPTS.get(name, []) if argv is None else argv)
        else:  # a benchmark whose main reads sys.argv
            module.main()
    return captured.value.args[0]


@pytest.mark.parametrize("name, argv", [(name, argv) for name, argv in sorted(SCRIPTS.items())] +
                         [("sample", ["SDE"]), ("sample_ddp", ["ODE"])] +  # each mode's own flags too
                         [(name, []) for name in BENCHMARKS])
def test_every_flag_has_help_and_shows_its_default(name, argv, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    parser = script_parser(name, monkeypatch, argv)
    assert parser.formatter_class is DefaultsInHelp
    formatter = DefaultsInHelp(name)
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name}: {action.option_strings[0]} has no help"
        if action.default is not None and action.default is not False:
            shown = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in shown.lower(), f"{name}: {action.option_strings[0]} hides its default"


def test_a_default_is_added_once_and_only_where_there_is_one(monkeypatch):
    help_text = script_parser("train", monkeypatch).format_help()
    assert "AdamW learning rate (the peak of --lr-schedule) (default: 0.0001)" in " ".join(help_text.split())
    assert "(default: None)" not in help_text and help_text.count("(default:") < len(help_text.splitlines())


def write_config(path, text: str) -> str:
    with open(path, "w") as handle:
        handle.write(text)
    return str(path)


def test_a_config_file_fills_flags_and_the_command_line_wins_said_once(tmp_path, capsys):
    import train

    config = write_config(tmp_path / "run.yaml", "data-path: /data\nlr: 2.0e-4\nphema_stds: [0.05, 0.1]\n"
                                                 "random_flip: false\nskip_batches: [[0, 7], [2, 31]]\n")
    args, explicit = train.parse_args(["--config", config, "--lr", "3e-4"])
    assert (args.data_path, args.lr, args.phema_stds, args.random_flip) == ("/data", 3e-4, (0.05, 0.1), False)
    assert args.skip_batches == ((0, 7), (2, 31)) and not hasattr(args, "config")
    assert {"data_path", "lr", "phema_stds", "random_flip", "skip_batches"} <= explicit  # a recipe's are given
    assert "max_steps" not in explicit
    err = capsys.readouterr().err
    assert err.count("--lr from the command line replaces lr: 0.0002") == 1  # parsed twice, said once


@pytest.mark.parametrize("text, words", [
    ("bogus: 1\n", ["bogus", "not a flag of"]),
    ("num_fid_samples: 8\n", ["num_fid_samples", "not a flag of"]),  # sample_ddp.py's, not train.py's
    ("global_batch_size: two\n", ["global_batch_size", "'two'"]),
    ("random_flip: 3\n", ["random_flip", "true or false"]),
    ("time_sampling: lognormal\n", ["time_sampling", "not one of"]),
    ("resume: results\n", ["resume", "not a flag of"]),  # where a run starts is the command line's
    ("- lr\n", ["mapping"]),
    ("lr: [\n", ["not YAML or JSON"]),
])
def test_a_bad_config_file_is_one_line_naming_the_key(text, words, tmp_path, capsys):
    import train
    from conftest import assert_names

    config = write_config(tmp_path / "bad.yaml", text)
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--data-path", str(tmp_path), "--config", config])
    assert exit_info.value.code == 2
    assert_names(capsys.readouterr().err.strip(), "--config", config, *words)


def test_the_experiments_config_yaml_reruns_the_same_settings(tmp_path, monkeypatch):
    """config.yaml holds the settings that differ from the defaults (the rest as comments): a new run from it
    resolves to the same settings; a JSON config file works alike."""
    import json
    import os

    import torch

    import train
    from conftest import make_image_folder

    monkeypatch.chdir(tmp_path)
    make_image_folder("data", num_classes=2, per_class=2, size=16)
    first = write_config(tmp_path / "first.json", json.dumps({
        "data_path": "data", "vae": "none", "image_size": 16, "num_classes": 2, "global_batch_size": 2,
        "max_steps": 1, "num_workers": 0, "sample_every": 100, "lr": 2e-4, "phema_stds": [0.05, 0.1],
        "model_config": json.dumps({"depth": 1, "hidden_size": 32, "num_heads": 2})}))
    train.main(["--config", first, "--results-dir", "one"])
    (experiment,) = os.listdir("one")
    saved = os.path.join("one", experiment, "config.yaml")
    with open(saved) as handle:
        text = handle.read()
    assert "\nlr: 0.0002\n" in text and "\n# ema_decay: 0.9999\n" in text and "resume" not in text
    train.main(["--config", saved, "--results-dir", "two"])
    args = [torch.load(os.path.join(folder, experiment, "checkpoints", "0000001.pt"), weights_only=True)["args"]
            for folder in ("one", "two")]
    assert {**args[0], "results_dir": None} == {**args[1], "results_dir": None}
