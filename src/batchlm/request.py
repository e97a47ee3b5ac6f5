"""What the front end hands the engine core for one sequence to generate."""

from __future__ import annotations

from dataclasses import dataclass

from batchlm.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineCoreRequest:
    """One sequence for the engine core. A request with n > 1 reaches the core as n of these,
    with the same prompt (the prefix cache lets them share the prompt's blocks)."""

    # Unique id within the engine core (the front end makes child ids for n > 1).
    request_id: str
    # Prompt token ids (never empty).
    prompt_token_ids: tuple[int, ...]
    # Sampling parameters. `n`, `stop` and detokenization are the front end's business; the core
    # honours the token-level fields (max_tokens, min_tokens, eos, stop_token_ids, sampling).
    sampling_params: SamplingParams
    # Token ids that end generation unless ignore_eos (from generation_config.json and the tokenizer).
    eos_token_ids: tuple[int, ...]
    # Wall-clock arrival time (time.time()), for queue-time metrics and FCFS order.
    arrival_time: float
    # Seed actually used for this sequence's sampler (derived per child for n > 1); None = unseeded.
    seed: int | None = None
    # The API request this sequence belongs to (its n siblings share it); "" = its own request_id.
    # The scheduler admits sequences fairly across these groups.
    group_id: str = ""
    # The front end reads this sequence only once it has finished (offline generation, or a response
    # that is not streamed, without stop strings or logprobs): the core may hold its tokens back and
    # report them all in one output, so that a decode step makes no output for it. A core may also
    # ignore this.
    final_output_only: bool = False
