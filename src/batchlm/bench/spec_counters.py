"""The server's speculative-decoding counters, read from its Prometheus /metrics before and after a
load level: their difference gives the level's draft acceptance rate. Servers without them (or
without /metrics) give None, and the report leaves the line out."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

# Counter names (Prometheus appends _total to counters) of batchlm and of vLLM.
PROPOSED_NAMES = ("batchlm_spec_proposed_tokens_total", "vllm:spec_decode_num_draft_tokens_total")
ACCEPTED_NAMES = ("batchlm_spec_accepted_tokens_total", "vllm:spec_decode_num_accepted_tokens_total")


@dataclass(frozen=True)
class SpecCounters:
    """Cumulative draft tokens the server verified and accepted."""

    proposed: float
    accepted: float


@dataclass(frozen=True)
class SpecActivity:
    """What one load level added to the counters."""

    proposed: float
    accepted: float

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed > 0 else None


def parse_spec_counters(text: str) -> SpecCounters | None:
    """The counters from a Prometheus text exposition (summed over label sets), or None if absent."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0].strip()
        if name in PROPOSED_NAMES or name in ACCEPTED_NAMES:
            try:
                totals[name] = totals.get(name, 0.0) + float(value)
            except ValueError:
                continue
    proposed = [totals[n] for n in PROPOSED_NAMES if n in totals]
    accepted = [totals[n] for n in ACCEPTED_NAMES if n in totals]
    if not proposed or not accepted:
        return None
    return SpecCounters(proposed=proposed[0], accepted=accepted[0])


async def read_spec_counters(
    session: aiohttp.ClientSession, metrics_url: str, headers: dict[str, str]
) -> SpecCounters | None:
    """GET the server's /metrics; None when it cannot be read or has no speculative counters."""
    try:
        async with session.get(metrics_url, headers=headers) as response:
            if response.status != 200:
                return None
            return parse_spec_counters(await response.text())
    except (aiohttp.ClientError, OSError, ValueError):
        return None


def activity_between(before: SpecCounters | None, after: SpecCounters | None) -> SpecActivity | None:
    if before is None or after is None:
        return None
    return SpecActivity(proposed=after.proposed - before.proposed, accepted=after.accepted - before.accepted)
