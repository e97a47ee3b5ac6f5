"""The one place a request is checked against the model: prompt length (in characters before it is
tokenized, in tokens after), context and KV-cache room, token-id ranges, max_tokens and the output
constraint. The HTTP front end, `LLM` and every engine's `generate` go through it; what comes out is a
ValidatedRequest, which the engine core and runner take as given (they only assert)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchlm.core.facts import ModelFacts
from batchlm.engine.client import RequestRejectedError
from batchlm.sampling_params import SamplingParams, StructuredOutputs
from batchlm.structured.factory import tokenizer_grammar_check

if TYPE_CHECKING:
    from batchlm.tokenizer.tokenizer import Tokenizer

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


@dataclass(frozen=True)
class FieldNames:
    """How the caller's API spells the fields an error names (chat sends "messages", completions "prompt")."""

    prompt: str = "prompt"
    # The field named when the prompt leaves no room in the context (chat's OpenAI error says "messages").
    context: str = "messages"
    # The field named when prompt + max_tokens overflow the context.
    budget: str = "max_tokens"
    structured_outputs: str = "structured_outputs"
    # The field that asked for the prompt's logprobs (completions: "echo", with "logprobs").
    prompt_logprobs: str = "prompt_logprobs"


@dataclass(frozen=True)
class ValidatedRequest:
    """A request that fits the model: max_tokens is resolved, every token id is in the vocabulary."""

    prompt_token_ids: list[int]
    params: SamplingParams
    # The prompt's text when the request was given one (RequestOutput.prompt).
    prompt: str | None = None


class InputProcessor:
    """Raises RequestRejectedError (a client error, HTTP 400) naming the field at fault."""

    def __init__(
        self,
        facts: ModelFacts,
        max_chars_per_token: int | None = None,
        default_max_tokens: int | None = None,
        grammar_check: Callable[[StructuredOutputs], None] | None = None,
    ) -> None:
        self.facts = facts
        # Checks a constraint against the model's tokenizer (the tokens a grammar names); raises
        # GrammarError. None: only the tokenizer-free checks.
        self.grammar_check = grammar_check
        # The most characters one token stands for (tokenizer/text_bound.py); None when unknown.
        self.max_chars_per_token = max_chars_per_token
        # The completion length of a request that sets none (the model's max_new_tokens), at most the
        # room the context leaves; None: all of that room.
        self.default_max_tokens = default_max_tokens

    @classmethod
    def for_model(
        cls, facts: ModelFacts, tokenizer: Tokenizer, default_max_tokens: int | None
    ) -> InputProcessor:
        """The processor of a loaded model (every front end's and LLM's): its tokenizer bounds a text's
        tokens and checks the tokens a grammar names."""
        grammar_check = tokenizer_grammar_check(tokenizer.hf, facts.vocab_size)
        return cls(facts, tokenizer.max_chars_per_token, default_max_tokens, grammar_check)

    def check_text_length(self, chars: int, param: str) -> None:
        """Refuse a text whose length alone shows it cannot fit the context, before tokenizing it: with
        tokens of at most L characters it needs more than max_model_len tokens beyond max_model_len x L."""
        per_token, max_len = self.max_chars_per_token, self.facts.max_model_len
        if per_token is not None and chars > max_len * per_token:
            raise RequestRejectedError(
                f"This model's maximum context length is {max_len} tokens. However, the text of '{param}' is "
                f"{chars} characters long, more than {max_len} tokens can hold (at most {max_len * per_token} "
                "characters for this tokenizer). Please shorten it.",
                param,
                CONTEXT_LENGTH_EXCEEDED,
            )

    def process(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        prompt: str | None = None,
        names: FieldNames = FieldNames(),
    ) -> ValidatedRequest:
        """A prompt that leaves no room is refused first, in O(1), without reading its ids. With
        truncate_prompt_tokens only the prompt's last tokens are kept (its text then no longer applies)."""
        keep = params.truncate_prompt_tokens
        if keep == -1:  # vLLM's "the context length"
            keep = self.facts.max_model_len
        if keep is not None and keep < len(prompt_token_ids):
            prompt_token_ids, prompt = prompt_token_ids[-keep:], None
        if not prompt_token_ids:
            raise RequestRejectedError(
                f"The {names.prompt} is empty: at least one token is needed.", names.prompt
            )
        self._check_room(len(prompt_token_ids), names)
        self.check_token_ids(prompt_token_ids, names.prompt)
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        self.check_token_ids(params.logit_bias, "logit_bias")
        params = self._with_budget(len(prompt_token_ids), params, names)
        self._check_kv_room(len(prompt_token_ids), params, names)
        if params.structured_outputs is not None:
            _check_structured_outputs(params, names.structured_outputs, self.grammar_check)
        if params.prompt_logprobs is not None and not self.facts.computes_prompt_logprobs:
            raise RequestRejectedError(
                "Prompt log-probabilities are not computed by this engine.",
                names.prompt_logprobs,
            )
        return ValidatedRequest(list(prompt_token_ids), params, prompt)

    def _check_room(self, prompt_len: int, names: FieldNames) -> None:
        max_len = self.facts.max_model_len
        if prompt_len >= max_len:
            raise RequestRejectedError(
                f"This model's maximum context length is {max_len} tokens. However, your {names.prompt} "
                f"resulted in {prompt_len} tokens, leaving no room for a completion. Please reduce the "
                f"length of the {names.prompt}.",
                names.context,
                CONTEXT_LENGTH_EXCEEDED,
            )

    def _with_budget(self, prompt_len: int, params: SamplingParams, names: FieldNames) -> SamplingParams:
        """`params` with max_tokens set: as asked, or the default length (else all the room the context
        leaves), cut to that room and to the room the whole KV cache leaves (which may hold fewer tokens
        than the context: a request that sets no length is then cut short, not refused)."""
        max_len = self.facts.max_model_len
        room = max_len - prompt_len
        if params.max_tokens is None:
            budget = min(room, self._kv_room(prompt_len), self.default_max_tokens or room)
            # At least one token: a prompt the cache cannot hold is refused by _check_kv_room.
            budget = max(1, budget)
            return params.clone(max_tokens=budget, min_tokens=min(params.min_tokens, budget))
        if params.max_tokens > room:
            raise RequestRejectedError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt_len + params.max_tokens} tokens ({prompt_len} in the {names.prompt}, "
                f"{params.max_tokens} in the completion). Please reduce the length of the {names.prompt} "
                "or completion.",
                names.budget,
                CONTEXT_LENGTH_EXCEEDED,
            )
        return params

    def _kv_room(self, prompt_len: int) -> int:
        """The most tokens a request of this prompt can generate in the whole KV cache (its last token
        takes no slot); the context length when the engine has no fixed cache."""
        num_blocks, block_size = self.facts.num_blocks, self.facts.block_size
        if not num_blocks:
            return self.facts.max_model_len
        return num_blocks * block_size + 1 - prompt_len

    def _check_kv_room(self, prompt_len: int, params: SamplingParams, names: FieldNames) -> None:
        """A request must fit the whole KV cache alone, or it could never run. The last generated token
        is never fed back, so it needs no slot."""
        assert params.max_tokens is not None
        if params.max_tokens <= self._kv_room(prompt_len):
            return
        num_blocks, block_size = self.facts.num_blocks, self.facts.block_size
        if prompt_len > num_blocks * block_size:
            # No max_tokens could make room: the prompt is what must shrink.
            raise RequestRejectedError(
                f"The {prompt_len} tokens of the {names.prompt} need {-(-prompt_len // block_size)} KV-cache "
                f"blocks ({block_size} tokens per block) but the whole cache has {num_blocks} blocks "
                f"({num_blocks * block_size} tokens); shorten the {names.prompt} or enlarge the KV cache.",
                names.context,
                CONTEXT_LENGTH_EXCEEDED,
            )
        longest = prompt_len + params.max_tokens
        needed = -(-(longest - 1) // block_size)
        raise RequestRejectedError(
            f"The request needs up to {needed} KV-cache blocks ({prompt_len} prompt tokens, up to "
            f"{longest} tokens in all, {block_size} per block) but the whole cache has {num_blocks} "
            "blocks; lower max_tokens or enlarge the KV cache.",
            "max_tokens",
        )

    def check_token_ids(self, token_ids: Iterable[int], param: str) -> None:
        vocab_size = self.facts.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise RequestRejectedError(
                f"Token id {bad} in '{param}' is out of range [0, {vocab_size}).", param
            )


def _check_structured_outputs(
    params: SamplingParams, param: str, grammar_check: Callable[[StructuredOutputs], None] | None
) -> None:
    """A constraint must compile, against the tokenizer too where a check is given (its error names the
    problem), and leave EOS allowed when it is done."""
    from batchlm.structured.backend import GrammarError
    from batchlm.structured.start_probe import edge_checked_grammar

    assert params.structured_outputs is not None
    if params.min_tokens:
        raise RequestRejectedError(
            "min_tokens cannot be combined with structured outputs (a complete output must be able to end)",
            "min_tokens",
        )
    try:
        edge_checked_grammar(params.structured_outputs)
        if grammar_check is not None:
            grammar_check(params.structured_outputs)
    except GrammarError as exc:
        raise RequestRejectedError(f"Invalid '{param}': {exc}", param) from None
