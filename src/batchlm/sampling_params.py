"""Per-request sampling parameters (the vLLM-shaped contract), validated on construction."""

from __future__ import annotations

import json as _json
import math
import numbers
import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any


class SamplingParamsError(ValueError):
    """An out-of-range or inconsistent sampling parameter; `param` names the offending field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


MAX_TOP_LOGPROBS = 20
# Most completions one request may ask for (`n`).
MAX_N = 128
# Temperatures below this sample as greedy: logits divided by one overflow float32 to infinities, and
# the distribution that is left is the argmax's anyway (vLLM takes the same bound).
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on a completion's text, enforced token by token; exactly one field is set.

    The API edge builds it from `response_format`, vLLM's `structured_outputs` and a forced tool
    choice; the engine compiles it with its grammar backend (compiled grammars are cached by `key`).
    """

    # A JSON schema, serialized as JSON.
    json: str | None = None
    # Any JSON object (`response_format: {"type": "json_object"}`).
    json_object: bool = False
    # A regular expression the whole output must match.
    regex: str | None = None
    # The output is exactly one of these strings.
    choice: tuple[str, ...] | None = None
    # A Lark grammar (GBNF is converted to Lark at the edge).
    grammar: str | None = None
    # Lark rules defining `preamble`: what may come before the constrained text (a reasoning model's
    # thinking block), itself unconstrained by it. Set by the edge, beside one of the fields above.
    preamble: str | None = None
    # (name, Lark grammar) of the grammars `grammar` refers to as `@name` (a client's own grammar in
    # the answer's place of a tool-call grammar). Set by the edge.
    subgrammars: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # vLLM's StructuredOutputsParams takes a schema as an object too (a pydantic model's
        # model_json_schema()); it is kept as JSON text, the form the grammar cache keys on.
        if self.json is not None and not isinstance(self.json, str):
            if not isinstance(self.json, dict | bool):
                raise SamplingParamsError(
                    f"structured_outputs.json must be a JSON schema (an object or its JSON text), "
                    f"got {type(self.json).__name__}",
                    "structured_outputs",
                )
            object.__setattr__(self, "json", schema_json(self.json))
        if self.choice is not None and not isinstance(self.choice, tuple):
            if isinstance(self.choice, str):
                raise SamplingParamsError(
                    "structured_outputs.choice must be a list of strings, not one string",
                    "structured_outputs",
                )
            object.__setattr__(self, "choice", tuple(self.choice))
        kinds = [self.json is not None, self.json_object, self.regex is not None]
        kinds += [self.choice is not None, self.grammar is not None]
        if sum(kinds) != 1:
            raise SamplingParamsError(
                "structured_outputs must set exactly one of json, json_object, regex, choice, grammar",
                "structured_outputs",
            )
        if self.choice is not None and not self.choice:
            raise SamplingParamsError("structured_outputs.choice must not be empty", "structured_outputs")
        if self.subgrammars and self.grammar is None:
            raise SamplingParamsError("structured_outputs.subgrammars need a grammar", "structured_outputs")

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): identifies the compiled grammar in the backend's cache."""
        kind, text = self.constraint_key
        if self.preamble is None:
            return kind, text
        return f"{kind}+preamble", f"{self.preamble}\x00{text}"

    @property
    def constraint_key(self) -> tuple[str, str]:
        """(kind, text) of the constraint itself, without the preamble."""
        if self.json is not None:
            return ("json", self.json)
        if self.json_object:
            return ("json_object", "")
        if self.regex is not None:
            return ("regex", self.regex)
        if self.choice is not None:
            return ("choice", "\x00".join(self.choice))
        assert self.grammar is not None
        if not self.subgrammars:
            return ("grammar", self.grammar)
        named = "".join(f"\x00{name}\x00{text}" for name, text in self.subgrammars)
        return ("grammar+subgrammars", f"{self.grammar}{named}")


NON_FINITE_SCHEMA = "the JSON schema holds NaN or Infinity, which are not JSON numbers"


def schema_json(schema: dict[str, Any] | bool) -> str:
    """A JSON schema as the compact JSON text StructuredOutputs keeps (its key order kept: it orders the
    output); compiled grammars are cached by this text. SamplingParamsError for NaN or an infinity in
    it, which JSON cannot spell (the grammar compiler would report a syntax error in this text)."""
    try:
        return _json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise SamplingParamsError(NON_FINITE_SCHEMA, "structured_outputs") from None


# vLLM's name for the same parameters.
StructuredOutputsParams = StructuredOutputs

# Fields that take a whole number (None allowed where the default is None) or a real number. They are
# checked and normalized (numpy scalars to Python numbers) on construction: a value of the wrong type
# would otherwise pass the range checks and fail later inside the engine's step, which cannot recover.
_INTEGER_FIELDS = (
    "n",
    "top_k",
    "seed",
    "max_tokens",
    "min_tokens",
    "logprobs",
    "prompt_logprobs",
    "truncate_prompt_tokens",
)
_REAL_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)

_BOOLEAN_FIELDS = (
    "ignore_eos",
    "detokenize",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "final_output_only",
)
# A token id as a JSON object key carries it (OpenAI's logit_bias): decimal digits, nothing else.
_TOKEN_ID_TEXT = re.compile(r"-?[0-9]+")
# Decimal texts this short convert with int() at once (longer ones take the checked path).
_FAST_ID_DIGITS = 18


def _sequence(value: Any, name: str) -> Any:
    """`value` when it is a list of items (None: empty); one bare item is an error naming the field."""
    if type(value) is list:
        return value
    if value is None:
        return ()
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise SamplingParamsError(f"{name} must be a list, got {value!r}", name)
    return value


def _token_id(value: Any, name: str, text_allowed: bool = False) -> int:
    """An int (a numpy integer too), or with text_allowed its decimal text; else an error naming the
    field (int() alone would take 1.5 as 1, "1_0" as 10 and " 7" as 7)."""
    if type(value) is int:
        return value
    try:
        if text_allowed and isinstance(value, str) and _TOKEN_ID_TEXT.fullmatch(value):
            return int(value)
        if not isinstance(value, bool | str):
            return operator.index(value)
    except (TypeError, ValueError):  # ValueError: text of more digits than int() converts
        pass
    if text_allowed:
        raise SamplingParamsError(
            f"{name} keys must be token ids (integers, or their decimal text), got {value!r}", name
        )
    raise SamplingParamsError(f"{name} must be token ids (integers), got {value!r}", name)


def _logit_bias(value: Any) -> dict[int, float]:
    """Token id (an int or its decimal text, as JSON object keys carry them) -> a finite bias."""
    if type(value) is not dict and not isinstance(value, Mapping):
        raise SamplingParamsError(f"logit_bias must map token ids to biases, got {value!r}", "logit_bias")
    bias: dict[int, float] = {}
    for key, number in value.items():
        # Fast paths first: a whole vocabulary's bias (150k entries) is checked on the event loop.
        if type(key) is str and len(key) <= _FAST_ID_DIGITS and key.isascii() and key.isdigit():
            key = int(key)
        elif type(key) is not int:
            key = _token_id(key, "logit_bias", text_allowed=True)
        if type(number) is int:
            number = float(number)
        elif type(number) is not float:
            if isinstance(number, bool) or not isinstance(number, numbers.Real):
                raise SamplingParamsError(
                    f"logit_bias values must be numbers, got {number!r} for token {key!r}", "logit_bias"
                )
            number = float(number)
        bias[key] = number
    return bias


@dataclass
class SamplingParams:
    """How to sample one request's completion(s). Raises SamplingParamsError on bad values."""

    # Number of completions for the prompt; they share the prompt's KV blocks.
    n: int = 1
    # 0 (or anything below GREEDY_TEMPERATURE) means greedy.
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 or -1 disables top-k.
    top_k: int = 0
    min_p: float = 0.0
    # HF-style multiplicative penalty over prompt and output tokens; 1.0 disables.
    repetition_penalty: float = 1.0
    # OpenAI-style additive penalties over output tokens; 0 disables.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Per-request seed: the same seed gives the same tokens whatever the batch-mates.
    seed: int | None = None
    # Max new tokens; None = up to the model's context limit.
    max_tokens: int | None = 16
    # EOS and stop tokens are masked, and stop strings not matched, until this many tokens are generated.
    min_tokens: int = 0
    ignore_eos: bool = False
    # Strings that end the completion; excluded from the text.
    stop: list[str] = field(default_factory=list)
    # Token ids that end the completion (in addition to EOS).
    stop_token_ids: list[int] = field(default_factory=list)
    # Number of top log-probabilities per output token (None = no logprobs; 0 = only the sampled one).
    logprobs: int | None = None
    # The same for every prompt token after the first (what the model gave it, given the tokens before):
    # None = none. Such a prompt is computed whole (no prefix-cache hits), as each token's logits are read.
    prompt_logprobs: int | None = None
    # Token id -> additive bias on the logits, applied before sampling. An id may be given as its decimal
    # text, as OpenAI's JSON object keys carry it.
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Detokenize the output (False gives token ids only).
    detokenize: bool = True
    skip_special_tokens: bool = True
    # Keep the matched stop string in the text.
    include_stop_str_in_output: bool = False
    # Constrained decoding (JSON schema, regex, choice, grammar); None = unconstrained.
    structured_outputs: StructuredOutputs | None = None
    # Keep only the prompt's last k tokens (left truncation, done by the input processor); -1 = the
    # model's context length, as in vLLM; None = all.
    truncate_prompt_tokens: int | None = None
    # The caller reads only the finished output (a response that is not streamed): without stop strings
    # or logprobs, the engine may then hold the tokens back and deliver them all when it finishes.
    final_output_only: bool = False

    def __post_init__(self) -> None:
        self._normalize_numbers()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(_sequence(self.stop, "stop"))
        bad_stop = next((s for s in self.stop if not isinstance(s, str)), None)
        if bad_stop is not None:
            raise SamplingParamsError(f"stop must be strings, got {bad_stop!r}", "stop")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise SamplingParamsError(
                "structured_outputs must be a StructuredOutputs (batchlm.sampling_params), got "
                f"{type(self.structured_outputs).__name__}",
                "structured_outputs",
            )
        self.stop_token_ids = [
            _token_id(t, "stop_token_ids") for t in _sequence(self.stop_token_ids, "stop_token_ids")
        ]
        self.logit_bias = _logit_bias(self.logit_bias) if self.logit_bias else {}
        for name in _BOOLEAN_FIELDS:
            value = getattr(self, name)
            if value is not True and value is not False:  # "no" would be true
                raise SamplingParamsError(f"{name} must be True or False, got {value!r}", name)
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def _normalize_numbers(self) -> None:
        # Every request's params are made (and cloned) this way: values already of the plain type, as
        # the server's are, pass at the cost of a type test.
        for name in _INTEGER_FIELDS:
            value = getattr(self, name)
            if type(value) is int or (value is None and name not in ("n", "top_k", "min_tokens")):
                continue
            try:
                if isinstance(value, bool):
                    raise TypeError
                setattr(self, name, operator.index(value))
            except TypeError:
                raise SamplingParamsError(f"{name} must be an integer, got {value!r}", name) from None
        for name in _REAL_FIELDS:
            value = getattr(self, name)
            if type(value) is float and math.isfinite(value):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise SamplingParamsError(f"{name} must be a finite number, got {value!r}", name)
            setattr(self, name, float(value))

    def validate(self) -> None:
        def fail(message: str, param: str) -> None:
            raise SamplingParamsError(message, param)

        if not isinstance(self.n, int) or self.n < 1 or self.n > MAX_N:
            fail(f"n must be between 1 and {MAX_N}, got {self.n}", "n")
        if self.temperature < 0 or self.temperature > 100:
            fail(f"temperature must be in [0, 100], got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            fail(f"top_k must be -1 (disabled), 0 (disabled) or positive, got {self.top_k}", "top_k")
        if not 0 <= self.min_p <= 1:
            fail(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not 0 < self.repetition_penalty <= 10:
            fail(
                f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}", "repetition_penalty"
            )
        if not -2 <= self.presence_penalty <= 2:
            fail(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}", "presence_penalty")
        if not -2 <= self.frequency_penalty <= 2:
            fail(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}", "frequency_penalty")
        keep = self.truncate_prompt_tokens
        if keep is not None and keep < 1 and keep != -1:
            fail(
                f"truncate_prompt_tokens must be -1 (the model's context length) or at least 1, got {keep}",
                "truncate_prompt_tokens",
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            fail(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if self.min_tokens < 0:
            fail(f"min_tokens must be non-negative, got {self.min_tokens}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                "min_tokens",
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            fail(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}", "logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            fail(
                f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}",
                "prompt_logprobs",
            )
        if any(not s for s in self.stop):
            fail("stop strings must be non-empty", "stop")
        if len(self.stop) > 16:
            fail(f"at most 16 stop strings are supported, got {len(self.stop)}", "stop")
        if self.stop and not self.detokenize:
            # Stop strings are matched in the text: without it they would be ignored without a word.
            fail("stop strings need detokenize=True (they are matched in the text)", "stop")
        if any(t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids must be non-negative", "stop_token_ids")
        for token_id, bias in self.logit_bias.items():
            if token_id < 0:
                fail(f"logit_bias token id {token_id} is negative", "logit_bias")
            if not -100 <= bias <= 100:
                fail(f"logit_bias values must be in [-100, 100], got {bias}", "logit_bias")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def clone(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)
