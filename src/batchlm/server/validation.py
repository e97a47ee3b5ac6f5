"""Engine requests validated for the API. A request under a structured-output constraint is validated
in a worker thread: compiling its grammar (a JSON schema of a megabyte takes seconds) on the event loop
would stall every other client, /health included, meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from batchlm.engine.input_processor import FieldNames, InputProcessor, ValidatedRequest
from batchlm.sampling_params import SamplingParams


async def validated_requests(
    processor: InputProcessor,
    prompts: Sequence[tuple[str | None, Sequence[int]]],
    params: SamplingParams,
    names: FieldNames,
) -> list[ValidatedRequest]:
    """One validated request per (text, token ids) prompt, all under `params`; raises the processor's
    RequestRejectedError for the first that is refused."""

    def validate() -> list[ValidatedRequest]:
        return [processor.process(ids, params, text, names) for text, ids in prompts]

    # An unconstrained request's checks are cheap: the thread hand-off would cost more than it frees.
    if params.structured_outputs is None:
        return validate()
    return await asyncio.to_thread(validate)
