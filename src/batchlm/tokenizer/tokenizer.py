"""The engine's tokenizer: a Hugging Face tokenizer plus EOS ids, chat-template rendering and token text."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from batchlm.tokenizer.chat_template import resolve_chat_template
from batchlm.tokenizer.eos_ids import configured_eos_ids, model_config_files, unique_ids
from batchlm.tokenizer.hf_loading import load_hf_tokenizer
from batchlm.tokenizer.text_bound import max_chars_per_token
from batchlm.tokenizer.token_bytes import TokenBytes, byte_level_pieces

if TYPE_CHECKING:
    import tokenizers
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Names of a tokenizer's templates when it has several: chat requests render the default one, and
# those that send tools the tool_use one where it exists (transformers' get_chat_template).
DEFAULT_TEMPLATE, TOOL_USE = "default", "tool_use"

# apply_chat_template's own parameters: passing them through chat_template_kwargs would change how
# transformers renders or tokenizes instead of reaching the template, so they are refused.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation", "messages", "chat_template", "add_generation_prompt", "continue_final_message",
        "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
        "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens",
    }
)  # fmt: skip


class NoChatTemplateError(ValueError):
    """The model has no chat template to render messages with (the message names the model's path and
    the operator's option: for the log and the command line, not for API clients)."""


class Tokenizer:
    """Wraps a transformers tokenizer with what the server and engine need.

    `decode` uses the Rust backend directly when that gives the same text as transformers' decode
    (the incremental detokenizer calls it twice per generated token where byte_pieces is None).
    """

    def __init__(
        self,
        hf: PreTrainedTokenizerBase,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
        name_or_path: str = "",
    ) -> None:
        self.hf = hf
        self.name_or_path = name_or_path or str(getattr(hf, "name_or_path", ""))
        # Every id the tokenizer can produce or decode, added tokens included.
        self.vocab_size: int = len(hf)
        self.bos_token_id: int | None = hf.bos_token_id
        self.eos_token_ids: tuple[int, ...] = unique_ids([*eos_token_ids, hf.eos_token_id])
        # The Jinja template apply_chat_template renders (the override, else the tokenizer's own).
        self.chat_template: str | None = chat_template or _own_chat_template(hf)
        # The model's template named "tool_use" (Hermes' and Command R's tokenizer configs name several),
        # rendered instead when a request sends tools; None with an override or a single template.
        self.tool_use_template: str | None = None if chat_template else _own_chat_template(hf, TOOL_USE)
        # Tokens added to the base vocabulary (special or not), by text: markers like Qwen's <tool_call>.
        self.added_tokens: Mapping[str, int] = dict(hf.get_added_vocab())
        self._backend = _exact_backend(hf)
        self._encode_backend = _exact_encode_backend(hf)
        self._adds_bos = self._tokenizer_adds_bos()
        self._token_bytes = TokenBytes(hf)
        # byte_pieces() per skip_special_tokens value, built on first use.
        self._byte_pieces: dict[bool, dict[int, bytes] | None] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
        eos_files: Sequence[Path] | None = None,
    ) -> Tokenizer:
        """Load from a local model directory. `chat_template` overrides the model's template and is a
        file path or a literal Jinja string. EOS ids are the union of the tokenizer's and the
        eos_token_id (int or list) of the first of `eos_files` that states one: the model's
        generation_config.json, then its config.json (by default those of `path`; the model's own where
        the tokenizer comes from another directory)."""
        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory {directory} does not exist (a local directory is expected)"
            )
        try:
            hf = load_hf_tokenizer(directory, trust_remote_code)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a bad directory
            raise ValueError(f"could not load a tokenizer from {directory}: {exc}") from exc
        template = resolve_chat_template(chat_template) if chat_template is not None else None
        if eos_files is None:
            eos_files = model_config_files(directory)
        tokenizer = cls(hf, configured_eos_ids(eos_files), template, str(directory))
        tokenizer._check_template_syntax()
        tokenizer.byte_pieces(skip_special_tokens=True)  # built at load, not by the first request
        _ = tokenizer.max_chars_per_token
        return tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Raises ValueError for text that is not valid Unicode (a lone UTF-16
        surrogate, e.g. from a "\\ud800" JSON escape)."""
        try:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        except TypeError:  # what the Rust tokenizer says of a surrogate: not a str it can take
            _check_unicode([text])
            raise

    def encode_many(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode() of each text, in one call: the Rust tokenizer encodes them on all cores with the
        GIL released, where that gives encode()'s result."""
        backend = self._encode_backend
        if backend is None or not texts:
            return [self.encode(text, add_special_tokens) for text in texts]
        try:
            encodings = backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        except TypeError:
            _check_unicode(texts)
            raise
        return [list(encoding.ids) for encoding in encodings]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`; ids outside the vocabulary decode to nothing."""
        if self._backend is not None:
            return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return str(self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def decoder(self, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:
        """decode() as a function of the ids alone, for callers that decode on every token: it goes
        straight to the Rust tokenizer where that gives decode()'s result."""
        backend = self._backend
        if backend is None:
            return lambda token_ids: self.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return lambda token_ids: str(backend.decode(token_ids, skip_special_tokens=skip_special_tokens))

    def byte_pieces(self, skip_special_tokens: bool = True) -> Mapping[int, bytes] | None:
        """id -> the bytes it adds to decode()'s text, where decode() is exactly the UTF-8 decoding
        (invalid bytes as U+FFFD) of those bytes joined (byte-level BPE tokenizers, checked when
        built); None otherwise. With it the incremental detokenizer appends bytes per token instead
        of decoding a window of ids twice."""
        if skip_special_tokens not in self._byte_pieces:
            pieces = None
            if self._backend is not None:
                try:
                    pieces = byte_level_pieces(self.hf, self._token_bytes, skip_special_tokens)
                except Exception as error:  # an unusual tokenizer: the window-decoding path serves it
                    logger.debug("byte-level detokenization is off for %s: %s", self.name_or_path, error)
            self._byte_pieces[skip_special_tokens] = pieces
        return self._byte_pieces[skip_special_tokens]

    @functools.cached_property
    def skipped_special_ids(self) -> frozenset[int]:
        """The ids decode(skip_special_tokens=True) leaves out of the text: added and special tokens
        that decode to nothing alone."""
        candidates = {*self.added_tokens.values(), *getattr(self.hf, "all_special_ids", ())}
        return frozenset(i for i in candidates if not self.decode([i], skip_special_tokens=True))

    @functools.cached_property
    def max_chars_per_token(self) -> int | None:
        """The most input characters one token can stand for (None when the pipeline gives no bound):
        a text longer than max_model_len times this cannot fit the context."""
        return max_chars_per_token(self.hf)

    def chat_template_for(self, tools: bool) -> str | None:
        """The template a conversation renders with: the model's "tool_use" template when it sends
        tools and the model names one, else its chat template (transformers' and vLLM's choice)."""
        return self.tool_use_template if tools and self.tool_use_template else self.chat_template

    def render_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
        chat_template: str | None = None,
    ) -> str:
        """The prompt text for `messages`, rendered by transformers' sandboxed Jinja environment
        (tools in `chat_template_kwargs` choose the template: chat_template_for), or by `chat_template`.

        Raises ValueError when there is no template, the arguments conflict, or rendering fails
        (including a template's own raise_exception).
        """
        import jinja2

        template = chat_template or self.chat_template_for(
            (chat_template_kwargs or {}).get("tools") is not None
        )
        if template is None:
            raise NoChatTemplateError(
                f"the model {self.name_or_path or '(unnamed)'} has no chat template; supply one with "
                "--chat-template (a file path or a literal Jinja string)"
            )
        if not messages:
            raise ValueError("messages must contain at least one message")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        kwargs = checked_template_kwargs(chat_template_kwargs)
        try:
            rendered = self.hf.apply_chat_template(
                messages,
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **kwargs,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template failed to render these messages: {exc}") from exc
        assert isinstance(rendered, str), type(rendered)
        return rendered

    @overload
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
        *,
        tokenize: Literal[True] = True,
        **template_kwargs: Any,
    ) -> list[int]: ...

    @overload
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
        *,
        tokenize: Literal[False],
        **template_kwargs: Any,
    ) -> str: ...

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
        *,
        tokenize: bool = True,
        **template_kwargs: Any,
    ) -> list[int] | str:
        """Token ids of the rendered chat. The special tokens the template writes are encoded as such;
        BOS appears exactly once when this tokenizer adds one by default, whether or not the template
        writes it (transformers alone would leave it out when the template does not).

        As transformers' method (which vLLM's get_tokenizer() gives): `tokenize=False` returns the
        text, and other keyword arguments (`tools`, `enable_thinking`, ...) reach the template."""
        kwargs = {**(chat_template_kwargs or {}), **template_kwargs} or None
        if not tokenize:
            return self.render_chat_template(messages, add_generation_prompt, kwargs, continue_final_message)
        return self.chat_prompt(messages, add_generation_prompt, kwargs, continue_final_message)[1]

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own EOS id (transformers' name; eos_token_ids adds the model's others)."""
        return self.hf.eos_token_id  # type: ignore[no-any-return]

    @property
    def pad_token_id(self) -> int | None:
        return self.hf.pad_token_id  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return self.vocab_size

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(token_ids, skip_special_tokens) for token_ids in sequences]

    def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
        chat_template: str | None = None,
    ) -> tuple[str, list[int]]:
        """The rendered chat's text and its token ids (apply_chat_template's)."""
        text = self.render_chat_template(
            messages, add_generation_prompt, chat_template_kwargs, continue_final_message, chat_template
        )
        return text, self.chat_ids(self.encode(text, add_special_tokens=False))

    def chat_ids(self, ids: list[int]) -> list[int]:
        """The ids of a rendered chat encoded without special tokens, with BOS put in front when this
        tokenizer adds one by default and the template did not write it (see apply_chat_template)."""
        if self._adds_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        """Raw vocabulary strings (e.g. 'Ġhello' for byte-level BPE); '' for ids outside the vocabulary."""
        tokens = self.hf.convert_ids_to_tokens(list(token_ids))
        return [token if isinstance(token, str) else "" for token in tokens]

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token contributes to the text (OpenAI logprobs' `bytes`)."""
        return self._token_bytes(token_id)

    def token_to_text(self, token_id: int) -> str:
        """A token's text for logprobs' `token` field. A token holding part of a multi-byte character
        shows its bytes as \\xNN escapes instead of U+FFFD, so it stays distinguishable."""
        return self._token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def _tokenizer_adds_bos(self) -> bool:
        if self.bos_token_id is None:
            return False
        return self.encode("a", add_special_tokens=True)[:1] == [self.bos_token_id]

    def _check_template_syntax(self) -> None:
        """Fail at start-up, not on the first request, when the template is not valid Jinja."""
        import jinja2

        if self.chat_template is None:
            return
        try:
            self.hf.apply_chat_template(
                [{"role": "user", "content": "hi"}], chat_template=self.chat_template, tokenize=False
            )
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"the chat template is not valid Jinja: {exc}") from exc
        except Exception:  # a template may legitimately reject this probe conversation
            pass


def _check_unicode(texts: Sequence[str]) -> None:
    """ValueError naming the first of `texts` that UTF-8 cannot encode (a lone surrogate)."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"the text contains a lone UTF-16 surrogate ({text[error.start]!a} at character "
                f"{error.start}), which is not valid Unicode"
            ) from None


def _own_chat_template(hf: PreTrainedTokenizerBase, name: str = DEFAULT_TEMPLATE) -> str | None:
    """The tokenizer's template of that name where it names several, else its only one (as default)."""
    template = getattr(hf, "chat_template", None)
    if isinstance(template, Mapping):
        template = template.get(name)
    elif name != DEFAULT_TEMPLATE:
        return None
    return template if isinstance(template, str) and template else None


def checked_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of `kwargs`; ValueError naming those that are apply_chat_template's own parameters."""
    kwargs = dict(kwargs or {})
    clashes = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if clashes:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(clashes)}")
    return kwargs


def _exact_backend(hf: PreTrainedTokenizerBase) -> tokenizers.Tokenizer | None:
    """The Rust tokenizer when decoding through it equals hf.decode: a stock fast tokenizer whose
    decode does no clean-up of spaces."""
    from transformers import PreTrainedTokenizerFast

    if not isinstance(hf, PreTrainedTokenizerFast) or type(hf)._decode is not PreTrainedTokenizerFast._decode:
        return None
    if getattr(hf, "clean_up_tokenization_spaces", False):
        return None
    return hf.backend_tokenizer


def _exact_encode_backend(hf: PreTrainedTokenizerBase) -> tokenizers.Tokenizer | None:
    """The Rust tokenizer when its encode_batch gives hf.encode's ids: a stock fast tokenizer (its
    encode is a call of encode_batch) that does not split special tokens. Checked on probe texts too,
    so an unusual tokenizer falls back to hf.encode rather than tokenize differently."""
    from transformers import PreTrainedTokenizerFast

    if not isinstance(hf, PreTrainedTokenizerFast) or getattr(hf, "split_special_tokens", False):
        return None
    if type(hf)._encode_plus is not PreTrainedTokenizerFast._encode_plus:
        return None
    backend = hf.backend_tokenizer
    special = "".join(str(token) for token in list(getattr(hf, "all_special_tokens", []))[:4])
    probes = ["Hello world", f" two  spaces\n\tand {special} specials, ünïcode 🦊 "]
    for add_special_tokens in (True, False):
        encoded = backend.encode_batch(probes, add_special_tokens=add_special_tokens)
        expected = [list(hf.encode(text, add_special_tokens=add_special_tokens)) for text in probes]
        if [list(encoding.ids) for encoding in encoded] != expected:
            return None
    return backend
