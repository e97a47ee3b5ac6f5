"""Offline batched generation: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
import signal
import threading
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Integral
from os import PathLike, fspath
from types import FrameType
from typing import Any

from tqdm.auto import tqdm

from batchlm.config import DEMO_MODEL, EngineConfig
from batchlm.cpu_wait_policy import prefer_passive_waiting
from batchlm.engine.chat_messages import parse_messages, template_conversation
from batchlm.engine.input_processor import InputProcessor, ValidatedRequest
from batchlm.engine.output_processor import OutputProcessor
from batchlm.executor.core_builder import build_engine_core
from batchlm.models.model_source import load_tokenizer, prepare_model_dir
from batchlm.outputs import RequestOutput
from batchlm.sampling_defaults import check_generation_config, sampling_defaults
from batchlm.sampling_params import SamplingParams
from batchlm.tokenizer.chat_template import resolve_chat_template
from batchlm.tokenizer.tokenizer import Tokenizer
from batchlm.tools.prompting import template_inputs

# Text, token ids, or vLLM's prompt dicts: {"prompt": text} and {"prompt_token_ids": ids} (with an
# optional "prompt" beside the ids, kept as the output's prompt text).
PromptInput = str | Sequence[int] | Mapping[str, Any]
PROMPT_DICT_KEYS = ("prompt", "prompt_token_ids")
# generate()'s progress bar shows once a call has run this long: short calls print nothing.
PROGRESS_DELAY_S = 1.0


class LLM:
    """An engine in this process, stepped until every submitted request is done.

    Keyword arguments are EngineConfig fields (max_model_len, dtype, device, tensor_parallel_size, ...).
    """

    def __init__(self, model: str | None = DEMO_MODEL, **kwargs: Any) -> None:
        """model: a model directory, GGUF file, hub id, or None / "demo" / "default" for the built-in one."""
        if model is None:
            model = DEMO_MODEL
        if not isinstance(model, str | PathLike):
            raise TypeError(f"model must be a path or a name, got {type(model).__name__}")
        model = fspath(model)
        unknown = set(kwargs) - set(EngineConfig.field_names())
        if unknown:
            raise TypeError(f"unknown LLM arguments: {', '.join(sorted(unknown))}")
        self.config = EngineConfig(model=model, **kwargs)
        check_generation_config(self.config.generation_config)
        prefer_passive_waiting(self.config.device)  # takes effect if torch is not loaded yet
        model_dir = prepare_model_dir(self.config)
        self.tokenizer = load_tokenizer(self.config, model_dir)
        self.engine_core, self.info = build_engine_core(self.config, model_dir)
        self.sampling_defaults = sampling_defaults(self.config.generation_config, model_dir)
        self.input_processor = InputProcessor.for_model(
            self.info, self.tokenizer, self.sampling_defaults.max_new_tokens
        )
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._caller: int | None = None  # the thread whose call holds the lock
        # True while an engine step runs: one cut short leaves results that never come (see generate).
        self._stepping = False

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate() and chat() sample with when given no SamplingParams: the model's recommended
        values (--generation-config), SamplingParams' defaults for the rest."""
        return self.sampling_defaults.params()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | Callable[..., tqdm] = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or a {"prompt": ...} / {"prompt_token_ids": ...}
        dict); results come back in prompt order. use_tqdm: a progress bar on stderr (prompts done,
        tokens a second) once the call has run PROGRESS_DELAY_S seconds; as in vLLM, a callable is used
        in place of tqdm to make the bar."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = _as_params_list(sampling_params, len(prompt_list))
        processor = OutputProcessor(self.tokenizer, text_when_finished=True)
        pairs = zip(prompt_list, params_list, strict=True)
        # Every prompt is validated before any is queued: one bad prompt fails the call with nothing
        # left running in the engine.
        requests = [self._validated(prompt, params) for prompt, params in pairs]
        order: list[str] = []
        # The engine core is single-threaded: a call from another thread waits for this one to end.
        if self._caller == threading.get_ident():
            raise RuntimeError("LLM.generate/chat was called again from inside a call in progress")
        with self._lock:
            self._caller = threading.get_ident()
            try:
                for request in requests:
                    order.append(self._submit(processor, request))
                progress_bar = use_tqdm if callable(use_tqdm) else tqdm
                with progress_bar(
                    total=len(order),
                    desc="Processed prompts",
                    unit="prompt",
                    delay=PROGRESS_DELAY_S,
                    disable=not use_tqdm,
                ) as progress:
                    results = self._run(processor, progress)
            except BaseException:
                # A failed or interrupted (Ctrl-C) call leaves nothing queued or running to slow down
                # the next one; what it had finished is dropped with it.
                self.engine_core.abort_requests(
                    [core_id for request_id in order for core_id in processor.core_ids_of(request_id)]
                )
                if self._stepping:  # the step that was cut short will never report
                    self._stepping = False
                    self.engine_core.forget_steps_in_flight()
                raise
            finally:
                self._caller = None
        return [results[request_id] for request_id in order]

    def chat(
        self,
        messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        *,
        use_tqdm: bool | Callable[..., tqdm] = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them, then generate. Messages are
        read as the chat endpoint reads them (RequestRejectedError for one it refuses). As in vLLM,
        each output's `prompt` is the rendered template; `tools` reach the template as its `tools`
        variable (a template that does not use them gets them in a system prompt); `chat_template`
        (Jinja text or a file, as --chat-template takes) renders instead of the model's."""
        template = resolve_chat_template(chat_template) if chat_template is not None else None
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts: list[PromptInput] = []
        for conversation in conversations:
            # Checked and converted as the HTTP API does, so both render the same prompt.
            converted = template_conversation(
                parse_messages(conversation),
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
            # Always, as HTTP does: a template without tool support gets earlier calls and results as text.
            rendering_template = template or self.tokenizer.chat_template_for(tools=tools is not None)
            converted, kwargs = template_inputs(converted, tools, rendering_template, chat_template_kwargs)
            text, ids = self.tokenizer.chat_prompt(
                converted, add_generation_prompt, kwargs, continue_final_message, template
            )
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _validated(self, prompt: PromptInput, params: SamplingParams) -> ValidatedRequest:
        text, ids = _prompt_parts(prompt)
        token_ids = ids if ids is not None else self.tokenizer.encode(text or "")
        return self.input_processor.process(token_ids, params, text)

    def _submit(self, processor: OutputProcessor, request: ValidatedRequest) -> str:
        request_id = str(next(self._counter))
        for core_request in processor.add_validated(request_id, request, self.tokenizer.eos_token_ids):
            self.engine_core.add_request(core_request)
        return request_id

    def _run(self, processor: OutputProcessor, progress: tqdm) -> dict[str, RequestOutput]:
        results: dict[str, RequestOutput] = {}
        prompt_tokens = output_tokens = 0
        with InterruptsBetweenSteps() as interrupts:
            while self.engine_core.has_work():
                interrupts.stepping = self._stepping = True
                step_outputs = self.engine_core.step()
                interrupts.stepping = self._stepping = False
                interrupts.raise_pending()
                outputs, to_abort = processor.process(step_outputs, delta=False, finished_only=True)
                if to_abort:
                    self.engine_core.abort_requests(to_abort)
                for output in outputs:
                    if not output.finished:
                        continue
                    results[output.request_id] = output
                    if progress.disable:
                        continue
                    prompt_tokens += len(output.prompt_token_ids)
                    output_tokens += sum(len(completion.token_ids) for completion in output.outputs)
                    elapsed = max(progress.format_dict["elapsed"], 1e-9)
                    progress.set_postfix_str(
                        f"input {prompt_tokens / elapsed:.1f} tok/s, output {output_tokens / elapsed:.1f} tok/s",
                        refresh=False,
                    )
                    progress.update(1)
        return results


class InterruptsBetweenSteps:
    """Ctrl-C while an engine step runs is raised once that step has ended, so that the engine's state
    stays whole and the call can be aborted cleanly; a second Ctrl-C during the same step is raised at
    once. Only on the main thread (the one Python delivers signals to), and only while SIGINT has
    Python's default handler (one the caller installed is left alone)."""

    def __init__(self) -> None:
        self.stepping = False
        self._pending = False
        self._installed = False

    def __enter__(self) -> InterruptsBetweenSteps:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            signal.signal(signal.SIGINT, self._on_interrupt)
            self._installed = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._installed = False

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        if not self.stepping or self._pending:
            raise KeyboardInterrupt
        self._pending = True

    def raise_pending(self) -> None:
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt


def _token_id_list(prompt: Sequence[int]) -> list[int]:
    """The ids as plain ints. Through a C array when every id is an integer (numpy's included): a long
    prompt converted id by id in Python cost more than the rest of its validation."""
    try:
        return array("q", prompt).tolist()
    except (TypeError, OverflowError):  # floats, ids beyond 64 bits: int() as before, range checked later
        return [int(t) for t in prompt]


def _prompt_parts(prompt: PromptInput) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of one prompt; the ids are None where the text is to be tokenized."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, Mapping):
        unknown = sorted(set(prompt) - set(PROMPT_DICT_KEYS))
        if unknown:
            raise ValueError(
                f"a prompt dict takes {' or '.join(map(repr, PROMPT_DICT_KEYS))}; {', '.join(map(repr, unknown))} "
                "is not supported (this engine serves text models)"
            )
        text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"a prompt dict's 'prompt' must be text, got {type(text).__name__}")
        if ids is not None:
            return text, _token_id_list(ids)
        if text is None:
            raise ValueError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")
        return text, None
    if not isinstance(prompt, Iterable) or isinstance(prompt, bytes | bytearray):
        raise TypeError(
            "each prompt must be text, a list of token ids, or a dict with 'prompt' or 'prompt_token_ids'; "
            f"got {type(prompt).__name__}"
        )
    return None, _token_id_list(prompt)  # type: ignore[arg-type]


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    if isinstance(prompts, str | Mapping):
        return [prompts]
    if not isinstance(prompts, Iterable) or isinstance(prompts, bytes | bytearray):
        raise TypeError(
            f"prompts must be text, token ids, a prompt dict, or a list of them; got {type(prompts).__name__}"
        )
    items = list(prompts)
    if items and all(isinstance(t, Integral) for t in items):  # numpy's integers too
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]


def _as_params_list(params: SamplingParams | Sequence[SamplingParams], count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    if not isinstance(params, Sequence) or isinstance(params, str):
        raise TypeError(
            f"sampling_params must be a SamplingParams or a list of them, got {type(params).__name__}"
        )
    params_list = list(params)
    wrong = next((p for p in params_list if not isinstance(p, SamplingParams)), None)
    if wrong is not None:
        raise TypeError(
            f"sampling_params must be a SamplingParams or a list of them, got a {type(wrong).__name__} in the list"
        )
    if len(params_list) != count:
        raise ValueError(f"got {len(params_list)} SamplingParams for {count} prompts")
    return params_list
