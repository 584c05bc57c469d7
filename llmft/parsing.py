"""Options declared once, as dataclasses: parsed from the command line and from YAML files, strictly.

Every command's options are dataclass fields, turned into flags by transformers' `HfArgumentParser` (both
`--snake_case` and `--kebab-case` spellings work); a field with `metadata={"positional": True}` is a positional
argument. Settings files (recipes, data builds, self-chat configs) are YAML mappings whose keys are the same field
names. An unknown key or flag is a problem that names the closest valid one, and every problem is reported at once
in one `ConfigError`. Light: imports neither torch nor TRL.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from llmft.errors import ConfigError

log = logging.getLogger(__name__)


def suggest(key: str, candidates: Iterable[str]) -> str:
    """" Did you mean 'x'?" for the closest candidate, or ""."""
    close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def unknown_keys(keys: Iterable[str], valid: Iterable[str], where: str) -> list[str]:
    """A problem for each key not in `valid`, naming the closest valid key. `where` prefixes each ("FILE: ")."""
    valid = set(valid)
    return [f"{where}unknown key '{key}'.{suggest(str(key), valid)}" for key in keys if key not in valid]


def field_types(classes: Iterable[type]) -> dict[str, Any]:
    """Each init field's resolved type, over several dataclasses."""
    types_ = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        types_.update({f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init})
    return types_


def coerce(values: dict[str, Any], kinds: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """YAML values checked against their fields' types (a number written as a string, such as 1e-4, becomes one);
    returns the values and a problem naming each key whose value does not fit."""
    out, problems = {}, []
    for key, value in values.items():
        try:
            out[key] = _coerce(kinds[key], value) if key in kinds else value
        except (TypeError, ValueError):
            wants_text = str in (kinds[key], *typing.get_args(kinds[key]))
            hint = (" YAML reads an unquoted yes/no/on/off as true/false: quote the word (e.g. 'no')."
                    if isinstance(value, bool) and wants_text else "")
            problems.append(f"{where}{key}: {value!r} is not {_describe(kinds[key])}.{hint}")
    return out, problems


def _coerce(kind: Any, value: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any or (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin is list:
        if isinstance(value, str) and args and args[0] is str:
            return [value]  # one name where a list of names goes (target_modules: all-linear)
        if not isinstance(value, list):
            raise TypeError(value)
        return [_coerce(args[0], v) for v in value] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(value)
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(value)
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(value)
        if kind is float and isinstance(value, int):
            return value  # an integer is a number: kept as written (num_train_epochs: 2 stays 2)
        number = kind(value)
        if kind is int and isinstance(value, float) and value != number:
            raise ValueError(value)
        return number
    if kind is str and not isinstance(value, str):
        raise TypeError(value)
    return value


def _describe(kind: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        args = typing.get_args(kind)
        if args and args[0] in (int, float):
            return "a list of numbers"
        return "a list of strings (or one string)" if args and args[0] is str else "a list"
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def read_yaml_mapping(path: str | Path, what: str = "settings file") -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty mapping)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError([f"{path}: no such file."], what=what) from err
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError([f"cannot read {path}: {err}"], what=what) from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping of key: value, got {type(raw).__name__}."], what=what)
    return raw


def build(classes: Iterable[type], values: Any, problems: list[str]) -> list[Any]:
    """One instance of each dataclass from the attributes of `values`; validation problems are added to `problems`."""
    built = []
    for cls in classes:
        try:
            built.append(cls(**{name: getattr(values, name) for name in field_names(cls)}))
        except ConfigError as err:
            problems.extend(err.problems)
            built.append(None)
        except (ValueError, TypeError, ArithmeticError) as err:  # the checks of TRL's and the Trainer's own configs
            problems.append(f"{getattr(cls, '_argument_group_name', cls.__name__)}: {err}")
            built.append(None)
    return built


def _is_str_bool(kind: Any) -> bool:
    """`str | bool`: a setting that is a word or a switch (transformers' include_num_input_tokens_seen)."""
    origin = typing.get_origin(kind)
    return (origin is typing.Union or origin is types.UnionType) and {str, bool} <= set(typing.get_args(kind))


def without_none(kind: Any) -> Any:
    """X for Optional[X]; any other type as it is."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    return args[0] if union and len(args) == 1 else kind


def _str_or_bool(text: str) -> str | bool:
    try:
        return string_to_bool(text)
    except Exception:  # argparse's ArgumentTypeError: not a yes/no word, so the word itself
        return text


class OptionParser(HfArgumentParser):
    """HfArgumentParser that raises ConfigError instead of exiting, takes positional fields, and keeps the word
    values of `str | bool` fields (HfArgumentParser would parse them as booleans only)."""

    def error(self, message: str):
        raise ConfigError([message], what=f"the options of {self.prog}")

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):
        metadata = dict(field.metadata)
        if metadata.pop("positional", False):
            parser.add_argument(field.name, **_positional(field, metadata))
        elif _is_str_bool(field.type):
            names = [f"--{field.name}"] + ([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])
            parser.add_argument(*names, type=_str_or_bool, default=field.default, help=metadata.get("help"))
        elif _is_word_or_words(field.type):  # report_to: tensorboard, or report_to: [tensorboard, mlflow]
            names = [f"--{field.name}"] + ([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])
            parser.add_argument(*names, nargs="+", action=_WordOrWords, default=field.default,
                                help=metadata.get("help"))
        elif without_none(field.type) is bool and field.default is None:
            # A switch whose absence means "not said" (a default from elsewhere); HfArgumentParser would need a value
            names = [f"--{field.name}"] + ([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])
            parser.add_argument(*names, type=string_to_bool, nargs="?", const=True, default=None,
                                help=metadata.get("help"))
        elif typing.get_origin(without_none(field.type)) is list and "nargs" in metadata:
            # HfArgumentParser makes every list flag nargs="+"; with "*", the flag alone means the empty list
            nargs = metadata.pop("nargs")
            field = copy.copy(field)
            field.metadata = types.MappingProxyType(metadata)
            HfArgumentParser._parse_dataclass_field(parser, field)
            parser._actions[-1].nargs = nargs
        else:
            HfArgumentParser._parse_dataclass_field(parser, field)


def _is_word_or_words(kind: Any) -> bool:
    """`str | list[str]` (optionally None): one name, or several."""
    args = {a for a in typing.get_args(kind) if a is not type(None)}
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and args == {str, list[str]}


class _WordOrWords(argparse.Action):
    """One value as the word itself, several as a list (HfArgumentParser took only one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


def _positional(field: dataclasses.Field, metadata: dict[str, Any]) -> dict[str, Any]:
    kind, kwargs = field.type, {"help": metadata.get("help"), "metavar": metadata.get("metavar")}
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[X]
        kind = args[0]
        kwargs.update(nargs="?", default=field.default)
    if typing.get_origin(kind) is list:
        kwargs.update(nargs="+", type=typing.get_args(kind)[0])
    else:
        kwargs["type"] = kind
    return {k: v for k, v in kwargs.items() if v is not None or k == "default"}


def parse(classes: list[type], argv: list[str], prog: str, description: str | None = None,
          defaults: dict[str, Any] | None = None, renamed: dict[str, str] | None = None,
          config_flag: str | None = None, rest: list[str] | None = None) -> list[Any]:
    """Instances of `classes` from `argv` (flags > `config_flag` YAML file > `defaults` > field defaults).

    `renamed` maps deprecated flags to their new names: they keep working, with a warning. With `config_flag`
    (a field naming a YAML file), that file's keys are the options' names, checked strictly. With `rest` (a list),
    unknown flags are not problems but are appended to it, for the command to pass on.
    """
    argv = _renamed(list(argv), renamed or {}, prog)
    parser = OptionParser(classes, prog=prog, description=description, allow_abbrev=False)
    if defaults:
        parser.set_defaults(**defaults)
    namespace, unknown = parser.parse_known_args(argv)
    if rest is not None:
        rest.extend(unknown)
        unknown = []
    problems = unknown_flags(unknown, [s for a in parser._actions for s in a.option_strings if s.startswith("--")])
    path = getattr(namespace, config_flag, None) if config_flag else None
    if path and not problems:
        kinds = field_types(classes)
        kinds.pop(config_flag, None)
        raw = {str(k).replace("-", "_"): v for k, v in read_yaml_mapping(path, "settings file").items()}
        problems += unknown_keys(raw, kinds, f"{path}: ")
        values, wrong = coerce({k: v for k, v in raw.items() if k in kinds}, kinds, f"{path}: ")
        problems += wrong
        parser.set_defaults(**values)
        namespace, _ = parser.parse_known_args(argv)
    built = build(classes, namespace, problems) if not problems else []
    if problems:
        raise ConfigError(problems, what=f"the options of {prog}")
    return built


def _renamed(argv: list[str], renamed: dict[str, str], prog: str) -> list[str]:
    out = []
    for arg in argv:
        flag, equals, value = arg.partition("=")
        if flag in renamed:
            log.warning("%s: %s is deprecated; use %s.", prog, flag, renamed[flag])
            arg = renamed[flag] + equals + value
        out.append(arg)
    return out


def unknown_flags(unknown: list[str], flags: list[str]) -> list[str]:
    """A problem for each unknown flag (naming the closest of `flags`) and each value that belongs to no flag."""
    problems, after_flag = [], False
    for arg in unknown:
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            problems.append(f"unknown option '{name}'.{suggest(name, flags)}")
            after_flag = "=" not in arg
        elif after_flag:  # the value of an unknown option, reported with it
            after_flag = False
        else:
            problems.append(f"unexpected value '{arg}' (options take the form --key value).")
    return problems
