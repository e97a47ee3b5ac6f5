"""Sampling values a model's authors recommend (its generation_config.json), used where a request gives
none, as transformers' `generate` and vLLM do: a model tuned to sample at temperature 0.6 and top_p
0.95 is served that way unless the request says otherwise. Its max_new_tokens is the length of a
completion whose request sets none (capped at the room the context leaves: engine/input_processor.py)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batchlm.json_files import read_json_object
from batchlm.sampling_params import SamplingParams, SamplingParamsError

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"
# --generation-config values besides a directory: the model's own file, or none at all ("vllm" is
# vLLM's name for none, which its start-up warning tells users to pass).
FROM_MODEL, NO_DEFAULTS, VLLM_NO_DEFAULTS = "auto", "none", "vllm"


# Fields whose values are whole numbers (a JSON float such as 40.0 is taken as one).
WHOLE_NUMBERS = ("top_k", "max_new_tokens")


@dataclass(frozen=True)
class SamplingDefaults:
    """The recommended values; None where the model recommends nothing (SamplingParams' default)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    # The completion length where a request sets none; not a SamplingParams field.
    max_new_tokens: int | None = None

    def given(self) -> dict[str, Any]:
        """The recommended sampling values by SamplingParams field name."""
        values = asdict(self)
        del values["max_new_tokens"]
        return {name: value for name, value in values.items() if value is not None}

    def params(self) -> SamplingParams:
        """SamplingParams with these values and every other field at its default; with no length
        (max_tokens None) where the model states one, which the input processor then applies cut to the
        room the context leaves (as vLLM's defaults take max_new_tokens for max_tokens)."""
        params = SamplingParams(**self.given())
        return params if self.max_new_tokens is None else params.clone(max_tokens=None)

    def describe(self) -> str:
        length = {} if self.max_new_tokens is None else {"max_new_tokens": self.max_new_tokens}
        return ", ".join(f"{name}={value:g}" for name, value in {**self.given(), **length}.items())


def sampling_defaults(source: str, model_dir: Path) -> SamplingDefaults:
    """The defaults `--generation-config` names: "auto" reads the model directory's
    generation_config.json, "none" (or "vllm") gives none, anything else is a directory holding such a
    file. A value that is not a valid sampling parameter is left out, with a warning."""
    check_generation_config(source)
    if source in (NO_DEFAULTS, VLLM_NO_DEFAULTS):
        return SamplingDefaults()
    file = (generation_config_dir(source) or model_dir) / GENERATION_CONFIG_FILE
    if not file.is_file():
        return SamplingDefaults()
    return SamplingDefaults(**_valid_values(read_json_object(file), file))


def generation_config_dir(source: str) -> Path | None:
    """The directory a --generation-config value names; None for the keywords."""
    if source in (FROM_MODEL, NO_DEFAULTS, VLLM_NO_DEFAULTS):
        return None
    return Path(source).expanduser()


def check_generation_config(source: str) -> None:
    """ValueError unless `source` is a --generation-config value (checked before the model loads)."""
    if source not in (FROM_MODEL, NO_DEFAULTS, VLLM_NO_DEFAULTS) and not Path(source).expanduser().is_dir():
        raise ValueError(
            f"--generation-config must be 'auto', 'none' or a directory holding {GENERATION_CONFIG_FILE}; "
            f"{source!r} is not a directory"
        )


def _valid_values(config: dict[str, object], file: Path) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in SamplingDefaults.__dataclass_fields__:
        value = config.get(name)
        if value is None:
            continue
        problem = _problem(name, value)
        if problem is not None:
            logger.warning("%s: %s left out of the sampling defaults (%s)", file, name, problem)
            continue
        assert isinstance(value, int | float)
        values[name] = int(value) if name in WHOLE_NUMBERS else float(value)
    return values


def _problem(name: str, value: object) -> str | None:
    """Why `value` cannot be the default of SamplingParams' `name` (or of max_new_tokens); None when it
    can."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    if name in WHOLE_NUMBERS and value != int(value):
        return f"expected an integer, got {value!r}"
    if name == "max_new_tokens":
        return None if value >= 1 else f"expected at least 1, got {value!r}"
    try:
        SamplingParams(**{name: int(value) if name == "top_k" else float(value)})  # type: ignore[arg-type]
    except SamplingParamsError as error:
        return str(error)
    return None
