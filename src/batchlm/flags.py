"""Command-line flags generated from config dataclasses (EngineConfig, ServerSettings): one flag per field,
its help text taken from the comment above the field, so a new field gets its flag without edits here.
Shared by `batchlm serve`, `batchlm generate` and `batchlm run-batch`."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
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


@dataclass(frozen=True)
class Bounds:
    """The values a numeric flag accepts; checked as the command line is parsed, so a bad value is a
    usage error before anything loads."""

    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound

    def problem(self, value: float) -> str | None:
        """What is wrong with `value` ("must be at least 1"), or None when it is in range."""
        too_low = (self.minimum is not None and value < self.minimum) or (
            self.above is not None and value <= self.above
        )
        too_high = self.maximum is not None and value > self.maximum
        if not (too_low or too_high):
            return None
        return "must be " + self.describe()

    def describe(self) -> str:
        """The accepted values in words ("at least 1", "from 0 to 65535"), as --help and errors say."""
        if self.minimum is not None and self.maximum is not None:
            return f"from {_plain(self.minimum)} to {_plain(self.maximum)}"
        lower = f"above {_plain(self.above)}" if self.above is not None else None
        if lower is None and self.minimum is not None:
            lower = f"at least {_plain(self.minimum)}"
        upper = None if self.maximum is None else f"at most {_plain(self.maximum)}"
        return " and ".join(part for part in (lower, upper) if part)


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def _number_parser(kind: type, takes_none: bool, bounds: Bounds | None) -> Callable[[str], Any]:
    """An argparse `type` for an int or float field: `none` gives None where `takes_none`, and values
    outside `bounds`, NaN and infinities are usage errors."""
    expected = ("an integer" if kind is int else "a number") + (' or "none"' if takes_none else "")

    def parse(text: str) -> Any:
        if takes_none and text.strip().lower() == "none":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        problem = bounds.problem(value) if bounds is not None else None
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{problem}{' (or none)' if takes_none else ''}, got {text}")
        return value

    return parse


def bounded_number(kind: type[int] | type[float], bounds: Bounds) -> Callable[[str], Any]:
    """An argparse `type` for a numeric flag that is not a dataclass field: out of `bounds` is a usage
    error."""
    return _number_parser(kind, False, bounds)


def non_empty_text(text: str) -> str:
    """An argparse `type` for a name or path: an empty value (`--api-key "$UNSET_VARIABLE"`) is a usage
    error rather than taken as the flag left out, or as the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _scalar_type(
    annotation: Any, default: Any, bounds: Bounds | None = None, may_be_empty: bool = False
) -> Any:
    """str | None -> str; dict[...] -> a JSON-object parser; int and float -> a parser checking
    `bounds`; str as it is, refusing an empty value unless `may_be_empty`. A number whose field takes
    None but defaults to a number also takes `none` (`--max-queue none`: no limit)."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        annotation = members[0]
    if typing.get_origin(annotation) is dict or annotation is dict:
        return _json_object
    if annotation in (int, float):
        return _number_parser(annotation, optional and default is not None, bounds)
    if annotation is str and not may_be_empty:
        return non_empty_text
    return annotation


def add_dataclass_arguments(
    parser: argparse._ActionsContainer,
    cls: type,
    *,
    flag_names: dict[str, list[str]] | None = None,
    choices: dict[str, list[str]] | None = None,
    help_notes: dict[str, str] | None = None,
    bounds: dict[str, Bounds] | None = None,
    may_be_empty: frozenset[str] = frozenset(),
    parsers: dict[str, Callable[[str], Any]] | None = None,
) -> None:
    """One flag per field of the dataclass `cls` (dest = the field name). `flag_names` overrides a
    field's flag spellings; a bool that defaults to True becomes `--no-<name>` (minus any `enable_`);
    `bounds` limits a numeric field's values; a text field takes an empty value only if named in
    `may_be_empty`; `parsers` reads a field of another type from its flag's text."""
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
        # An empty text shown as JSON too: `(default: )` reads as a default left out.
        shown = json.dumps(default) if isinstance(default, dict) or default == "" else default
        field_bounds = (bounds or {}).get(name)
        if field_bounds is not None:
            shown = f"{shown}; {field_bounds.describe()}"
        parser.add_argument(
            *(flags or [f"--{name.replace('_', '-')}"]),
            dest=name,
            type=(parsers or {}).get(name)
            or _scalar_type(hints[name], default, field_bounds, name in may_be_empty),
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
        doc = f"On unless this flag is given: {doc[:1].lower()}{doc[1:]}"
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
# What the engine would refuse only once the model is loaded, or take silently as "automatic".
POSITIVE = Bounds(minimum=1)
ENGINE_BOUNDS = {
    "max_model_len": POSITIVE,
    "max_num_seqs": POSITIVE,
    "max_num_batched_tokens": POSITIVE,
    "block_size": POSITIVE,
    "gpu_memory_utilization": Bounds(above=0, maximum=1),
    "cpu_kv_cache_gib": Bounds(above=0),
    "num_gpu_blocks_override": POSITIVE,
    "tensor_parallel_size": POSITIVE,
    "num_speculative_tokens": POSITIVE,
    "speculative_max_batch": Bounds(minimum=0),
    "speculative_pool_tokens": Bounds(minimum=0),
    # What torch's generators take; beyond, the engine failed only once the model had loaded.
    "seed": Bounds(minimum=-(2**63), maximum=2**64 - 1),
}


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The EngineConfig flags, in their own group."""
    from batchlm.config import EngineConfig

    group = parser.add_argument_group("engine (batchlm.config.EngineConfig)")
    add_dataclass_arguments(
        group, EngineConfig, flag_names=ENGINE_FLAG_NAMES, choices=ENGINE_CHOICES, bounds=ENGINE_BOUNDS
    )


def engine_flag_conflicts(args: argparse.Namespace) -> str | None:
    """A flag given where the rest of the engine flags make it mean nothing (it would be silently
    ignored), or None."""
    from batchlm.config import SPECULATION_FLAGS, speculation_flag_conflict

    return speculation_flag_conflict(
        args.speculative, {name: getattr(args, name) for name in SPECULATION_FLAGS}
    )
