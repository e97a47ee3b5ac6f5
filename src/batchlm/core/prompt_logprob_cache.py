"""The prompt logprobs of prefix-cached blocks, so that a request asking for its prompt's logprobs (an
eval scoring choices that share a context) takes prefix-cache hits as far as they are kept here: the
kept entries stand in for the rows it does not compute, and its computed rows give the rest.

Block i's rows (positions iB .. iB+B-1) predict the tokens at positions iB+1 .. iB+B. The last of these
is the first token of the next block, which the block's hash does not cover, so an entry is keyed by
the block's hash and that token. A request whose first c blocks are hits computes from position cB on,
whose rows predict the tokens from cB+1: the kept entries of blocks 0..c-1 cover positions 1..cB."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from batchlm.core.block_pool import BlockHash
from batchlm.core.request_state import RequestState
from batchlm.outputs import TokenLogprobs

# The host memory the kept entries may take, estimated (entry_bytes): a bound of its own, as this cache
# does not follow the KV cache's evictions. An eval's shared contexts take a small part of it.
PROMPT_LOGPROB_CACHE_BYTES = 64 << 20


def entry_bytes(num_top: int) -> int:
    """About what one kept entry takes: a TokenLogprobs with num_top alternatives (measured in CPython)."""
    return 152 + 121 * num_top


@dataclass(frozen=True)
class _BlockEntries:
    # Alternatives listed per entry (SamplingParams.prompt_logprobs); fewer are served by truncation.
    num_top: int
    entries: tuple[TokenLogprobs, ...]


def gathers_prompt_logprobs(state: RequestState) -> bool:
    """Whether the request still has to report its prompt's logprobs (they come with its first output)."""
    return state.first_output_pending and state.sampling_params.prompt_logprobs is not None


class PromptLogprobCache:
    def __init__(self, block_size: int, capacity_bytes: int | None = None) -> None:
        self.block_size = block_size
        self.capacity_bytes = capacity_bytes or PROMPT_LOGPROB_CACHE_BYTES
        self.num_bytes = 0
        self._blocks: OrderedDict[tuple[BlockHash, int], _BlockEntries] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def take(self, state: RequestState, num_cached_blocks: int) -> int:
        """How many of the request's leading `num_cached_blocks` hit blocks have their entries here (at
        least as many alternatives as it asks); their entries are set on the request for its first
        output (state.cached_prompt_logprobs)."""
        num_top = state.sampling_params.prompt_logprobs
        assert num_top is not None
        found: list[TokenLogprobs] = []
        num_taken = 0
        for index in range(num_cached_blocks):
            key = self._key(state, index)
            kept = self._blocks.get(key)
            if kept is None or kept.num_top < num_top:
                break
            self._blocks.move_to_end(key)
            if kept.num_top == num_top:
                found += kept.entries
            else:
                found += (replace(entry, top=entry.top[:num_top]) for entry in kept.entries)
            num_taken += 1
        state.cached_prompt_logprobs = tuple(found)
        return num_taken

    def complete(self, state: RequestState, computed: Sequence[TokenLogprobs]) -> tuple[TokenLogprobs, ...]:
        """The request's prompt logprobs (positions 1 .. n-1): the entries taken at admission, then those
        its rows computed. Each full block's are kept for later requests."""
        entries = (*state.cached_prompt_logprobs, *computed)
        state.cached_prompt_logprobs = ()
        num_top = state.sampling_params.prompt_logprobs
        assert num_top is not None
        size = self.block_size
        # Block i needs the token after it, at position (i + 1) * size <= len(entries).
        for index in range(min(len(entries) // size, len(state.block_hashes))):
            key = self._key(state, index)
            kept = self._blocks.get(key)
            if kept is None or kept.num_top < num_top:
                if kept is not None:
                    self.num_bytes -= size * entry_bytes(kept.num_top)
                self._blocks[key] = _BlockEntries(num_top, entries[index * size : (index + 1) * size])
                self.num_bytes += size * entry_bytes(num_top)
            self._blocks.move_to_end(key)
        while self.num_bytes > self.capacity_bytes and self._blocks:
            _, oldest = self._blocks.popitem(last=False)
            self.num_bytes -= size * entry_bytes(oldest.num_top)
        return entries

    def _key(self, state: RequestState, index: int) -> tuple[BlockHash, int]:
        """Block `index`'s key: its hash and the token after it, which its last row predicts."""
        return state.block_hashes[index], state.all_token_ids[(index + 1) * self.block_size]
