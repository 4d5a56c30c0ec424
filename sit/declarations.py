"""Settings declared once: a frozen dataclass per feature, one `declare`d field per setting (flag help, type,
choices, default, resume rule; `repa_depth` -> `--repa-depth`), read by `add_flags`, `resume_rules` and
`from_values`. `resume`: None keeps the command line's value on a resume; a `sit.config.Setting` reads the
checkpoint's unless the flag is given (LOCKED: a contradiction is an error; WARN: a warning; FREE: silent)."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import AbstractSet, Any, Callable, Mapping, Optional, Sequence

from sit.config import Setting, flag_name
from sit.errors import UsageError


@dataclass(frozen=True)
class Needs:
    """A setting that only means something when another holds: `condition` names it in messages (e.g.
    "--repa-encoder"), `holds(settings)` says whether it does for the settings group's values."""
    condition: str
    holds: Callable[[Any], bool]


def declare(default: Any, help: str, *, type: Optional[Callable[[str], Any]] = None,
            choices: Optional[Sequence[Any]] = None, action: Any = None, nargs: Optional[str] = None, const: Any = None,
            metavar: Optional[str] = None, one_of: Optional[str] = None, resume: Optional[Setting] = None,
            canonical: Optional[Callable[[Any], Any]] = None, needs: Optional[Needs] = None) -> Any:
    """A settings dataclass field: its default, its flag (argparse's add_argument keywords; one_of: a required
    choice between the flags that name the same group), its resume rule, (canonical) how a given value is
    named wherever the run starts (e.g. a local file: its real path) and (needs) the condition without which
    the flag would do nothing (giving it then is an error)."""
    options = {key: value for key, value in (("type", type), ("choices", choices), ("action", action),
                                              ("nargs", nargs), ("const", const), ("metavar", metavar))
               if value is not None}
    metadata = {"flag": {"help": help, **options}, "one_of": one_of, "resume": resume, "canonical": canonical,
                "needs": needs}
    return dataclasses.field(default=default, metadata=metadata)


def declared_fields(settings_type: type) -> list[dataclasses.Field]:
    """The fields of a settings dataclass that declare a flag, in declaration order."""
    return [field for field in dataclasses.fields(settings_type) if "flag" in field.metadata]


def add_flags(parser: argparse.ArgumentParser, settings_type: type) -> None:
    """The settings' flags, in a group titled by the class's TITLE (none: on the parser itself)."""
    title = getattr(settings_type, "TITLE", None)
    group = parser.add_argument_group(title) if title else parser
    exclusive: dict[str, Any] = {}  # one_of -> its mutually exclusive group (one flag of it is required)
    for field in declared_fields(settings_type):
        one_of = field.metadata["one_of"]
        if one_of and one_of not in exclusive:
            exclusive[one_of] = group.add_mutually_exclusive_group(required=True)
        target = exclusive[one_of] if one_of else group
        flag = field.metadata["flag"]
        target.add_argument(flag_name(field.name), dest=field.name, default=field.default, **flag)


def from_values(settings_type: type, values: Mapping[str, Any]) -> Any:
    """The settings from a flat dict keyed by destination (every field of the class must be there)."""
    return settings_type(**{field.name: values[field.name] for field in dataclasses.fields(settings_type)})


def check_needs(settings: Any, explicit: AbstractSet[str]) -> None:
    """UsageError naming the flags given (explicit) whose condition does not hold: they would do nothing."""
    unmet: dict[str, list[str]] = {}
    for field in declared_fields(type(settings)):
        needs = field.metadata["needs"]
        if needs is not None and field.name in explicit and not needs.holds(settings):
            unmet.setdefault(needs.condition, []).append(flag_name(field.name))
    for condition, flags in unmet.items():
        raise UsageError(f"{', '.join(flags)} {'is' if len(flags) == 1 else 'are'} read only with {condition}: add "
                         f"it or drop {' and '.join(flags)}")


def canonical_values(settings_type: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """values with each of these settings' values in its canonical form (see declare)."""
    values = dict(values)
    for field in declared_fields(settings_type):
        if field.metadata["canonical"] is not None:
            values[field.name] = field.metadata["canonical"](values[field.name])
    return values


def resume_rules(settings_type: type, flags: Mapping[str, Any]) -> dict[str, Setting]:
    """The settings a checkpoint can give, with the flags' values as their defaults (see resolve_settings)."""
    return {field.name: dataclasses.replace(field.metadata["resume"], default=flags[field.name])
            for field in declared_fields(settings_type) if field.metadata["resume"] is not None}
