"""sit/cli.py: every flag of every script says what it does and, where it has one, its default."""
import argparse
import importlib

import pytest

from sit.cli import DefaultsInHelp

SCRIPTS = {"train": [], "sample": ["ODE"], "sample_ddp": ["SDE"], "extract_features": [], "evaluate": [],
           "reconstruct_ema": [], "export_digits": [], "plot_metrics": []}


class Captured(Exception):
    """Raised by the patched parse_args with the parser a script built."""


def script_parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script's main builds (its parse_args is stopped before it reads the command line)."""
    def capture(parser, args=None, namespace=None):
        raise Captured(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = importlib.import_module(name)
    with pytest.raises(Captured) as captured:
        module.main(SCRIPTS[name])
    return captured.value.args[0]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_flag_has_help_and_shows_its_default(name, monkeypatch):
    parser = script_parser(name, monkeypatch)
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
