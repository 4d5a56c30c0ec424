"""What the scripts share about the command line: argparse value types, the speed flags, telling explicit
flags from defaults, and `run_main`: library errors as one line and an exit code (docs/reliability.md)."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import traceback
from typing import Any, Callable, NoReturn, Optional, Sequence

import yaml

from sit.distributed import launched_by_torchrun, launched_rank, launched_world_size
from sit.errors import SiTError, error_line
from sit.speed import PRECISION_CHOICES
from train_utils import checked_number, non_negative_float, none_or_str, positive_float  # noqa: F401  (all types from here)


positive_int = checked_number(int, lambda x: x > 0, "a positive integer", "positive_int")
non_negative_int = checked_number(int, lambda x: x >= 0, ">= 0", "non_negative_int")
decay_rate = checked_number(float, lambda x: 0.0 <= x < 1.0, "in [0, 1)", "decay_rate")
unit_interval_float = checked_number(float, lambda x: 0.0 <= x <= 1.0, "in [0, 1]", "unit_interval_float")
guidance_scale = checked_number(float, lambda x: math.isfinite(x) and x >= 1.0, ">= 1 (1 means no guidance)",
                                "guidance_scale")


def class_label_list(value: str) -> list[int]:
    """argparse type: comma-separated non-negative integers, e.g. 1,2,3."""
    try:
        labels = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3, got {value!r}")
    if not labels:
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers such as 1,2,3, got {value!r}")
    negative = [label for label in labels if label < 0]
    if negative:
        raise argparse.ArgumentTypeError(f"class labels are non-negative integers, got {negative[0]} in {value!r}")
    return labels


class DefaultsInHelp(argparse.HelpFormatter):
    """Help text that states each flag's default, unless the text already speaks of it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


CONFIG_FLAG = "--config"
NOT_IN_CONFIG_FILES = ("config", "ckpt", "resume")  # where a run starts is the command line's, never a recipe's
NOTED: set[str] = set()  # the command line's overrides of --config already said (a script may parse twice)


def flag_text(value: Any) -> str:
    """A config file's value as the command line writes it: lists comma-separated, pairs joined by ':'
    (e.g. --phema-stds 0.05,0.1; --skip-batches 0:7,2:31)."""
    if isinstance(value, (list, tuple)):
        return ",".join(":".join(map(str, item)) if isinstance(item, (list, tuple)) else str(item) for item in value)
    return str(value)


class ScriptParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line, `<prog>: error: <message> (see <prog> --help)`,
    exit 2; a value such as -1e-4 is a (negative) number, not an unknown flag. `--config FILE` (YAML or JSON
    flags by name) fills the flags the command line does not give (checked by each flag's type and choices;
    a flag given too wins, said once); flags a config file fills count as given (parse_with_explicit)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", DefaultsInHelp)
        super().__init__(*args, **kwargs)
        # a value such as -1 or -1,0 (e.g. --class-labels -1,0) is a value, not a flag: its flag's type names it
        number = r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
        self._negative_number_matcher = re.compile(rf"^-{number[2:]}(,{number})*$")
        self.add_argument(CONFIG_FLAG, metavar="FILE", default=None,
                          help="a YAML or JSON file of this script's flags by name (e.g. `lr: 1.0e-4`, as "
                               "configs/*.yaml and an experiment's config.yaml); flags on the command line win")

    def error(self, message: str) -> None:  # argparse's hook for every command-line error
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        path = next((args[index + 1] for index, arg in enumerate(args[:-1]) if arg == CONFIG_FLAG), None)
        path = next((arg.split("=", 1)[1] for arg in args if arg.startswith(CONFIG_FLAG + "=")), path)
        if path is not None:
            self.set_defaults(**self.config_values(path, args))
        parsed, extras = super().parse_known_args(args, namespace)
        vars(parsed).pop("config", None)  # the file's flags are in the namespace; its name is no setting
        return parsed, extras

    def config_values(self, path: str, args: Sequence[str]) -> dict[str, Any]:
        """The flag values a config file gives, by destination, each parsed by its flag (one-line errors
        naming the key); a required choice (e.g. --data-path or --feature-path) it fills is met."""
        try:
            with open(path) as handle:
                loaded = yaml.safe_load(handle)  # JSON is YAML too
        except OSError as error:
            self.error(f"{CONFIG_FLAG} {path}: cannot read it ({describe_os_error(error)})")
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            self.error(f"{CONFIG_FLAG} {path}: not YAML or JSON ({one_line(str(error))[:200]})")
        if not isinstance(loaded, dict):
            self.error(f"{CONFIG_FLAG} {path}: expected `flag: value` lines (a mapping), got {type(loaded).__name__}")
        actions = {action.dest: action for action in self._actions if action.option_strings}
        given = {action.dest for arg in args for action in actions.values() if arg.split("=", 1)[0] in action.option_strings}
        values = {}
        for key, value in loaded.items():
            dest = str(key).replace("-", "_")
            action = actions.get(dest)
            if action is None or dest in NOT_IN_CONFIG_FILES or isinstance(action, argparse._HelpAction):
                self.error(f"{CONFIG_FLAG} {path}: {key} is not a flag of {self.prog} that a config file may set")
            values[dest] = self.config_value(action, value, f"{CONFIG_FLAG} {path}: {key}")
            if dest in given and f"{path}:{dest}" not in NOTED and launched_rank() == 0:
                NOTED.add(f"{path}:{dest}")
                print(f"{self.prog}: {action.option_strings[-1]} from the command line replaces {key}: {value!r} "
                      f"of {path}", file=sys.stderr)
        for group in self._mutually_exclusive_groups:
            if any(action.dest in values for action in group._group_actions):
                group.required = False
        return values

    def config_value(self, action: argparse.Action, value: Any, where: str) -> Any:
        """A config file's value for one flag, as the command line's text would parse (type, choices)."""
        if action.nargs == 0:  # store_true and the like: a boolean
            if not isinstance(value, bool):
                self.error(f"{where} must be true or false, got {value!r}")
            return value
        if value is None:
            return None
        items = value if action.nargs not in (None, "?") and isinstance(value, (list, tuple)) else [value]
        try:
            parsed = [action.type(flag_text(item)) if action.type else flag_text(item) for item in items]
        except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
            self.error(f"{where}: {error or 'invalid value'} (got {value!r})")
        if action.choices is not None and any(item not in action.choices for item in parsed):
            self.error(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
        return parsed if action.nargs not in (None, "?") else parsed[0]


def add_speed_arguments(parser: argparse.ArgumentParser, precision_default: Optional[str] = "tf32") -> None:
    """--precision and --compile (precision_default None: a script can tell an explicit --precision apart)."""
    group = parser.add_argument_group("Speed arguments")
    group.add_argument("--precision", type=str, choices=PRECISION_CHOICES, default=precision_default,
                       help="fp32; tf32 (the original's default: fp32 weights, TF32 matmuls on GPUs); bf16 or fp16 "
                            "autocast of the model (and VAE) forward, weights, EMA and optimizer state stay fp32; "
                            "auto: bf16 on CPUs with bf16 matrix units (AMX, AVX512-BF16), fp32 on other CPUs, tf32 "
                            "on GPUs (docs/speed.md); records and checkpoints store the choice made")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile each transformer block (the first steps are slow while compiling)")


def parse_with_explicit(build_parser: Callable[[], argparse.ArgumentParser],
                        argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, frozenset[str]]:
    """Parse argv, and tell which destinations the command line gave explicitly (a second parse with every
    default replaced by a marker that no command line can produce)."""
    args = build_parser().parse_args(argv)
    not_given = object()
    explicit_parser = build_parser()
    explicit_parser.set_defaults(**{key: not_given for key in vars(args)})
    given = vars(explicit_parser.parse_args(argv))
    return args, frozenset(key for key, value in given.items() if value is not not_given)


INTERRUPTED_EXIT_CODE = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


def one_line(message: str) -> str:
    """A message as one line (its lines joined by spaces). An error re-raised by a DataLoader worker
    carries the worker's traceback; its last line is the error itself."""
    lines = [line.strip() for line in message.strip().splitlines()]
    if "Original Traceback (most recent call last):" in lines:
        lines = lines[-1:]
    return " ".join(line for line in lines if line)


def run_main(main: Callable[[], Any], script: str) -> int:
    """Run a script's main(); returns its exit code. The user's errors (SiTError, an OSError, Ctrl-C) are one
    line `<script>: error: <message>` on rank 0 only (every rank agrees on them). Any other exception is a
    bug: its traceback and a last line `<script>: error: unexpected <Type>: ...`, exit 1, on every rank that
    raised it (a bug may hit one rank alone)."""
    try:
        main()
        return 0
    except SiTError as error:
        message, code = str(error), error.exit_code
    except OSError as error:  # a file the run could not read or write
        message, code = describe_os_error(error), 1
    except KeyboardInterrupt:
        message, code = "interrupted (Ctrl-C); what was written is complete, the same command continues", \
            INTERRUPTED_EXIT_CODE
    except Exception as error:  # not foreseen by any check: a bug, shown with its traceback on every rank
        traceback.print_exc(file=sys.stderr)
        where = f"; rank {launched_rank()} of {launched_world_size()}" if launched_world_size() > 1 else ""
        print(f"{script}: error: unexpected {error_line(error)} "
              f"(a bug: please report it with the traceback above{where})", file=sys.stderr, flush=True)
        return 1
    if launched_rank() == 0:
        print(f"{script}: error: {one_line(message)}", file=sys.stderr, flush=True)
    return code


def describe_os_error(error: OSError) -> str:
    """An OSError as `<what failed>: <path>`, e.g. "Permission denied: /data/out", or its own text."""
    if error.strerror and error.filename is not None:
        return f"{error.strerror}: {error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
    return str(error)


def exit_process(code: int) -> NoReturn:
    """End a script's process with `code` (`exit_process(run_main(main, "train.py"))`). Under torchrun:
    os._exit once stdout and stderr are flushed, skipping the teardown whose Gloo/NCCL destructors can abort
    a finished worker (docs/reliability.md, "Stopping a torchrun job")."""
    if not launched_by_torchrun():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more to say
            stream.flush()
    os._exit(code)
