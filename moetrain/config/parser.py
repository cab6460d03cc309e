"""The `moetrain train` flags, generated from the option() declarations of the config dataclasses.

Flags have no argparse default, so the parsed namespace holds exactly the flags that were given; each
flag's ``dest`` is the ``"section.field"`` it sets. Precedence: dataclass defaults < the DeepSpeed JSON
(``--deepspeed_config``) < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from moetrain.config.deepspeed import FractionOfLr, read_deepspeed_config
from moetrain.config.option import ConfigError, Option, field_default, flag_type, option_of
from moetrain.config.sections import SECTIONS, Config, TrainingConfig

TRAIN_DESCRIPTION = "Pre-train a Mixture-of-Experts GPT language model."
# --help groups in order: a field is in its option()'s group, or else in its section's
GROUP_TITLES = {
    "model": "model",
    "moe": "mixture of experts",
    "data": "data",
    "training": "training",
    "precision": "mixed precision (DeepSpeed fp16 semantics)",
    "logging": "evaluation, logging and checkpoints",
    "parallel": "parallelism",
    "deepspeed": "DeepSpeed compatibility",
    "distill": "knowledge distillation (Mixture-of-Students)",
    "monitor": "monitoring: loss spikes, expert health, routing record and replay, W&B, profiler",
}
_GIVEN_FLAGS = "_moetrain_given_flags"


class FieldFlags(NamedTuple):
    """One config field with flags: where it lives and what sets it."""

    dest: str  # "section.field"
    group: str
    field: dataclasses.Field
    option: Option


def field_flags(sections: tuple[str, ...] = tuple(SECTIONS)) -> Iterator[FieldFlags]:
    """Every config field that has a flag, section by section in declaration order."""
    for section in sections:
        for field in dataclasses.fields(SECTIONS[section]):
            spec = option_of(field)
            if spec is not None and spec.flag_names():
                yield FieldFlags(f"{section}.{field.name}", spec.group or section, field, spec)


class _GivenFlag(NamedTuple):
    flag: str
    shown: str  # the flag with its value, for messages


class _FieldAction(argparse.Action):
    """Store a flag's value at its "section.field" dest and remember which flag set it.

    Two different spellings of one field with different values (``--max-steps 10 --train-iters 20``,
    ``--fp16 --bf16``) are an error instead of last-one-wins; a repeated flag: the last one wins.
    """

    def __init__(self, option_strings: list[str], dest: str,
                 convert: Callable[[Any], Any] | None = None, **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.convert = convert

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        value = self.const if self.nargs == 0 else values
        if self.convert is not None:
            try:
                value = self.convert(value)
            except ValueError as error:
                raise argparse.ArgumentError(self, str(error)) from None
        flag = option_string or self.dest
        shown = flag if self.nargs == 0 else f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"
        given: dict[str, _GivenFlag] = getattr(namespace, _GIVEN_FLAGS, {})
        previous = given.get(self.dest)
        if previous is not None and previous.flag != flag and getattr(namespace, self.dest) != value:
            raise ConfigError(f"{previous.shown} and {shown} both set {self.dest}; pass only one")
        setattr(namespace, self.dest, value)
        given[self.dest] = _GivenFlag(flag, shown)
        setattr(namespace, _GIVEN_FLAGS, given)


def _add_field(group: argparse._ArgumentGroup, flags: FieldFlags) -> None:
    """The value flag of a field (its help ends with the default, its metavar is the field name), then its
    switches; all appear in the namespace only when given."""
    spec = flags.option
    if spec.names:
        kwargs = dict(spec.argparse)
        kwargs["type"] = flag_type(flags.field)
        if kwargs["type"] is None:
            del kwargs["type"]
        if spec.choices is not None:
            kwargs["choices"] = spec.choices
        else:
            kwargs.setdefault("metavar", flags.field.name.upper())
        default = field_default(flags.field)
        help = f"{spec.help} (default: {default})" if default is not None else spec.help
        group.add_argument(*spec.names, dest=flags.dest, action=_FieldAction, default=argparse.SUPPRESS,
                           help=help, **kwargs)
    for switch in spec.switches:
        group.add_argument(switch.name, dest=flags.dest, action=_FieldAction, default=argparse.SUPPRESS,
                           nargs=0, const=switch.value, help=switch.help)


# the "deepspeed" group's flags, which set no config field: (flag names, add_argument keywords)
DEEPSPEED_ARGS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--deepspeed_config", "--deepspeed-config"),
     {"dest": "deepspeed_config", "metavar": "PATH",
      "help": "DeepSpeed JSON config; its settings apply unless a flag above overrides them"}),
    (("--deepspeed",),
     {"action": "store_true", "dest": "deepspeed_flag",
      "help": "accepted so Megatron-DeepSpeed launch scripts run unchanged; moetrain always uses its own engine"}),
    (("--local_rank", "--local-rank"),
     {"type": int, "dest": "local_rank", "metavar": "N",
      "help": "passed by the deepspeed launcher and accepted; the LOCAL_RANK it also sets picks the device"}),
)


def add_config_args(parser: argparse.ArgumentParser, sections: tuple[str, ...] = tuple(SECTIONS),
                    deepspeed: bool = False) -> None:
    """Add the flags of the given config sections (and the DeepSpeed group) to a parser, grouped as in
    GROUP_TITLES."""
    fields = list(field_flags(sections))
    for name, title in GROUP_TITLES.items():
        members = [flags for flags in fields if flags.group == name]
        if members or (deepspeed and name == "deepspeed"):
            group = parser.add_argument_group(title)
            for flags in members:
                _add_field(group, flags)
            if name == "deepspeed":
                for names, kwargs in DEEPSPEED_ARGS:
                    group.add_argument(*names, **kwargs)


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Add every `moetrain train` flag group, e.g. to a subcommand parser."""
    add_config_args(parser, deepspeed=True)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, ("model",))


def add_moe_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, ("moe",))


def build_train_parser(prog: str = "moetrain train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=TRAIN_DESCRIPTION)
    add_train_args(parser)
    return parser


def parse_train_args(argv: list[str] | None = None) -> Config:
    """Flags (and the DeepSpeed JSON they name) -> Config; call Config.validate once the world size is known."""
    return config_from_namespace(build_train_parser().parse_args(argv))


def given_fields(namespace: argparse.Namespace) -> dict[str, Any]:
    """The config fields set by flags on the command line, as {"section.field": value}."""
    return {dest: getattr(namespace, dest) for dest in getattr(namespace, _GIVEN_FLAGS, {})}


def config_from_namespace(namespace: argparse.Namespace) -> Config:
    """Merge defaults < DeepSpeed JSON < explicitly given flags, warning once per flag that overrides the JSON."""
    given: dict[str, _GivenFlag] = getattr(namespace, _GIVEN_FLAGS, {})
    explicit = given_fields(namespace)
    json_path = getattr(namespace, "deepspeed_config", None)
    from_json = read_deepspeed_config(json_path) if json_path else {}

    min_lr = from_json.get("training.min_lr")
    if min_lr is not None and isinstance(min_lr.value, FractionOfLr):
        lr = explicit.get("training.lr", from_json["training.lr"].value if "training.lr" in from_json
                          else TrainingConfig.lr)
        from_json["training.min_lr"] = min_lr._replace(value=min_lr.value.ratio * lr)

    for dest, value in explicit.items():
        setting = from_json.get(dest)
        if setting is not None and setting.value != value:
            warnings.warn(f"{given[dest].shown} overrides {setting.source} in {json_path}", stacklevel=2)

    merged = {dest: setting.value for dest, setting in from_json.items()} | explicit
    if "training.global_batch_size" in from_json:
        merged.setdefault("training.micro_batch_size", None)  # derived by resolve(), as DeepSpeed does
    nested: dict[str, dict[str, Any]] = {}
    for dest, value in merged.items():
        section, name = dest.split(".")
        nested.setdefault(section, {})[name] = value
    return Config.from_dict(nested)


def to_flags(cfg: Config, sections: tuple[str, ...] = tuple(SECTIONS)) -> list[str]:
    """The flags that set every field of the given sections whose value differs from its default: a switch
    that sets the value, else the field's value flag with the value written out."""
    flags: list[str] = []
    for dest, _, field, spec in field_flags(sections):
        value = getattr(getattr(cfg, dest.split(".")[0]), field.name)
        if value == field_default(field):
            continue
        switches = [switch.name for switch in spec.switches if switch.value == value]
        if switches:
            flags.append(switches[0])
        elif spec.names:
            flags += [spec.names[0], *map(str, value)] if isinstance(value, list) else [spec.names[0], str(value)]
    return flags
