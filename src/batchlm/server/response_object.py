"""The response object of POST /v1/responses at each stage (in progress, finished, failed): its
output and usage, with the request's settings it echoes as OpenAI does."""

from __future__ import annotations

import time
from typing import Literal

from batchlm.sampling_params import SamplingParams
from batchlm.server.protocol_responses import (
    IncompleteDetails,
    InputTokensDetails,
    OutputItem,
    OutputTokensDetails,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from batchlm.server.responding import ResponseContext
from batchlm.server.responses import UsageInfo

ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


def response_object(
    body: ResponsesRequest,
    context: ResponseContext,
    params: SamplingParams,
    stored: bool,
    status: ResponseStatus,
    output: list[OutputItem],
    usage: UsageInfo | None = None,
    thinking: int = 0,
    error: ResponseError | None = None,
) -> ResponseObject:
    text_format = body.text.format if body.text is not None and body.text.format is not None else None
    return ResponseObject(
        id=context.request_id,
        created_at=context.created,
        completed_at=int(time.time()) if status == "completed" else None,
        status=status,
        error=error,
        incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
        model=context.model,
        output=list(output),
        usage=None if usage is None else response_usage(usage, thinking),
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        # The values it samples with (the request's, else the model's recommended ones), as OpenAI
        # reports the ones it used rather than null.
        temperature=params.temperature,
        top_p=params.top_p,
        tools=body.tools or [],
        tool_choice=body.tool_choice or "auto",  # OpenAI's default, tools or none
        parallel_tool_calls=body.parallel_tool_calls is not False,
        text={
            "format": text_format.model_dump(by_alias=True, exclude_none=True)
            if text_format
            else {"type": "text"}
        },
        reasoning={"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
        metadata=body.metadata or {},
        user=body.user,
        previous_response_id=body.previous_response_id,
        store=stored,
        truncation=body.truncation or "disabled",
    )


def response_usage(usage: UsageInfo, thinking: int) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=usage.prompt_tokens_details.cached_tokens),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=thinking),
        total_tokens=usage.total_tokens,
    )
