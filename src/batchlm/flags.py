"""Command-line flags generated from config dataclasses (EngineConfig, ServerSettings): one flag per field,
its help text taken from the comment above the field, so a new field gets its flag without edits here.
Shared by `batchlm serve` and `batchlm generate`."""

from __future__ import annotations

import argparse
import inspect
import json
import re
import types
import typing
from dataclasses import MISSING, fields
from typing import Any, TypeVar

T = TypeVar("T")

_FIELD_LINE = re.compile(r"(\w+)\s*:")


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the `#` comment lines directly above it in the class body, joined."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = _FIELD_LINE.match(stripped)
        if match and pending:
            comments[match.group(1)] = " ".join(pending)
        pending = []
    return comments


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"key\": 1}'")
    return value


def _scalar_type(annotation: Any, default: Any) -> Any:
    """str | None -> str; dict[...] -> a JSON-object parser; int/float/str as they are. A number whose
    field takes None but defaults to a number also takes `none` (`--max-queue none`: no limit)."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        annotation = members[0]
    if typing.get_origin(annotation) is dict or annotation is dict:
        return _json_object
    if optional and default is not None and annotation in (int, float):
        return _number_or_none(annotation)
    return annotation


def _number_or_none(number: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float | None:
        return None if text.lower() == "none" else number(text)

    parse.__name__ = number.__name__  # argparse names the type in its error: "invalid int value"
    return parse


def add_dataclass_arguments(
    parser: argparse._ActionsContainer,
    cls: type,
    *,
    flag_names: dict[str, list[str]] | None = None,
    choices: dict[str, list[str]] | None = None,
    help_notes: dict[str, str] | None = None,
) -> None:
    """One flag per field of the dataclass `cls` (dest = the field name). `flag_names` overrides a
    field's flag spellings; a bool that defaults to True becomes `--no-<name>` (minus any `enable_`)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for spec in fields(cls):
        name = spec.name
        default = _default_of(spec)
        doc = comments.get(name, name.replace("_", " ")) + (help_notes or {}).get(name, "")
        flags = (flag_names or {}).get(name)
        if hints[name] is bool:
            _add_bool_flag(parser, name, bool(default), doc, flags)
            continue
        field_choices = (choices or {}).get(name)
        shown = json.dumps(default) if isinstance(default, dict) else default
        parser.add_argument(
            *(flags or [f"--{name.replace('_', '-')}"]),
            dest=name,
            type=_scalar_type(hints[name], default),
            default=default,
            choices=field_choices,
            metavar=None if field_choices else name.upper(),
            help=_escape(f"{doc} (default: {shown})"),
        )


def _add_bool_flag(
    parser: argparse._ActionsContainer, name: str, default: bool, doc: str, flags: list[str] | None
) -> None:
    """A switch that flips the default: `--<name>` for False defaults, `--no-<name>` for True ones."""
    bare = name.removeprefix("enable_").replace("_", "-")
    if default:
        flags = flags or [f"--no-{bare}"]
        doc = f"Turn off: {doc[:1].lower()}{doc[1:]}"
    parser.add_argument(
        *(flags or [f"--{bare}"]),
        dest=name,
        action="store_false" if default else "store_true",
        default=default,
        help=_escape(doc),
    )


def _escape(help_text: str) -> str:
    return help_text.replace("%", "%%")  # argparse formats help with %-interpolation


def _default_of(spec: Any) -> Any:
    if spec.default is not MISSING:
        return spec.default
    if spec.default_factory is not MISSING:
        return spec.default_factory()
    return None


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    values = {spec.name: getattr(args, spec.name) for spec in fields(cls)}  # type: ignore[arg-type]
    return cls(**values)


# The seed README's spellings and a few fixed choices; every other engine flag is the field name.
ENGINE_FLAG_NAMES = {"max_num_seqs": ["--batch-size", "--max-num-seqs"]}
ENGINE_CHOICES = {
    "dtype": ["auto", "float32", "bfloat16", "float16"],
    "load_format": ["auto", "dummy"],
    "quantization": ["int8", "fp8", "w4a16"],
    "kv_cache_dtype": ["auto", "fp16", "fp32", "fp8"],
    "async_scheduling": ["auto", "on", "off"],
    "speculative": ["auto", "off", "ngram"],
}


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The EngineConfig flags, in their own group."""
    from batchlm.config import EngineConfig

    group = parser.add_argument_group("engine (batchlm.config.EngineConfig)")
    add_dataclass_arguments(group, EngineConfig, flag_names=ENGINE_FLAG_NAMES, choices=ENGINE_CHOICES)
