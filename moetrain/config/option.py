"""How a config field declares its command-line flags, once, beside its default: ``option(...)`` metadata.

A field's flags, help text and choices live in ``dataclasses.field(metadata=...)``; the parser
(config/parser.py), the validation of choices (config/validation.py) and the flag reference
(docs/flags.md) are all generated from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

_OPTION = "moetrain_option"
_NO_FLAG_TYPES = {"str", "str | None", "list[str] | None"}  # argparse keeps these as given
_FLAG_TYPES = {"int": int, "int | None": int, "float": float, "float | None": float}


class ConfigError(ValueError):
    """An inconsistent or unusable option; the message is one line that names the fix."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class Switch:
    """A flag that takes no value and sets its field to `value` (``--fp16``, ``--no-save``)."""

    name: str
    value: Any
    help: str


@dataclass(frozen=True)
class Option:
    """The flags of one config field: a flag that takes a value (with aliases), switches, or both."""

    names: tuple[str, ...]  # the flag taking a value, then its aliases; empty: switches only (or no flag)
    help: str
    switches: tuple[Switch, ...]
    choices: tuple[Any, ...] | None
    group: str | None  # the --help group; None: the field's section
    argparse: dict[str, Any]  # type, nargs, metavar, ... (type defaults from the field's annotation)
    label: str | None  # how messages name the field when it has no flag taking a value

    def flag_names(self) -> list[str]:
        return [*self.names, *(switch.name for switch in self.switches)]


def option(default: Any, *names: str, help: str = "", switches: tuple[Switch, ...] = (),
           choices: tuple[Any, ...] | None = None, group: str | None = None, label: str | None = None,
           **argparse_kwargs: Any) -> Any:
    """A config field with default `default`, settable by the flag `names[0]` (aliases after it) and `switches`.

    With neither names nor switches the field has no flag (set from the DeepSpeed JSON or at run time).
    """
    spec = Option(names, help, switches, choices, group, argparse_kwargs, label)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={_OPTION: spec})
    return dataclasses.field(default=default, metadata={_OPTION: spec})


def switch(name: str, value: Any, help: str) -> Switch:
    return Switch(name, value, help)


def option_of(field: dataclasses.Field) -> Option | None:
    """The flags a field declared with option(), None for a plain field."""
    return field.metadata.get(_OPTION)


def field_default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def flag_type(field: dataclasses.Field) -> Any:
    """The argparse type of a field's value flag: given to option(), or int / float from its annotation."""
    spec = option_of(field)
    if spec is not None and "type" in spec.argparse:
        return spec.argparse["type"]
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    if annotation in _FLAG_TYPES:
        return _FLAG_TYPES[annotation]
    if annotation not in _NO_FLAG_TYPES and spec is not None and spec.names:
        raise TypeError(f"give option(type=...) for the {field.name} flag: its annotation {annotation!r} is not "
                        f"one of {', '.join([*_FLAG_TYPES, *_NO_FLAG_TYPES])}")
    return None


def field_label(field: dataclasses.Field) -> str:
    """How error messages name a field: its first flag (``--moe-score-func``), else its label or name."""
    spec = option_of(field)
    if spec is not None and spec.names:
        return spec.names[0]
    return spec.label if spec is not None and spec.label else field.name


def check_choice(section: Any, name: str) -> None:
    """Raise ConfigError when a field's value is not one of the choices its option() declares."""
    field = next(f for f in dataclasses.fields(section) if f.name == name)
    choices = option_of(field).choices
    value = getattr(section, name)
    check(value in choices, f"{field_label(field)} {value!r} is not one of {', '.join(map(str, choices))}")
