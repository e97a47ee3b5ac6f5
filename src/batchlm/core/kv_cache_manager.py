"""Per-request KV block tables on top of the block pool, with prefix-cache lookup and sharing."""

from __future__ import annotations

from dataclasses import dataclass

from batchlm.core.block_pool import BlockHash, BlockPool, hash_block, root_block_hash
from batchlm.core.request_state import RequestState


@dataclass
class _BlockTable:
    """One request's blocks and how far its full blocks have reached the prefix cache."""

    # KV-cache block ids in token order: token i lives in block_ids[i // block_size].
    block_ids: list[int]
    # Leading full blocks that are computed and offered to the prefix cache (or came from it).
    num_committed: int = 0
    # Full blocks [num_committed, pending_end) are being computed: identical prompts wait for them.
    pending_end: int = 0


class KVCacheManager:
    """Allocates blocks for the tokens a request computes, shares cached prefix blocks between
    requests, and registers each newly computed full block in the prefix cache once.

    A full block's hash chains its parent's hash with its token ids, so a block is reused only
    under an identical prefix (the first block's parent is the salt's root hash).
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, salt: str = ""
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._root_hash = root_block_hash(salt)
        # Blocks of sequences under the long rotation hold other keys for the same tokens.
        self._long_rope_root_hash = root_block_hash(salt + "\0long RoPE")
        self._tables: dict[str, _BlockTable] = {}
        # Hash -> number of running requests that will compute that block but have not yet.
        self._pending: dict[BlockHash, int] = {}

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (free list + evictable cached blocks)."""
        return self.pool.num_available

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, 0..1."""
        return self.pool.num_used / self.pool.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (empty when it holds none). Do not mutate."""
        table = self._tables.get(request_id)
        return table.block_ids if table is not None else []

    def unsent_block_ids(self, state: RequestState) -> tuple[int, ...]:
        """The blocks of the request's table not yet sent to the runner, now marked sent. Tables only
        grow while held, and a preemption resets the count (the runner drops its copy), so these are
        appends."""
        block_ids = self.block_ids(state.request_id)
        new_block_ids = tuple(block_ids[state.num_blocks_sent :])
        state.num_blocks_sent = len(block_ids)
        return new_block_ids

    def is_pending(self, block_hash: BlockHash) -> bool:
        return block_hash in self._pending

    def find_cached_prefix(self, state: RequestState) -> list[int]:
        """Block ids of the longest run of cached full blocks that starts the request's tokens.
        The run stops before the last token, which must be computed to get logits."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (state.num_tokens - 1) // self.block_size
        self._extend_hashes(state, max_blocks)
        hits: list[int] = []
        for index in range(max_blocks):
            block = self.pool.lookup(state.block_hashes[index])
            if block is None:
                break
            hits.append(block)
        return hits

    def waits_on_pending_block(self, state: RequestState, num_cached_blocks: int) -> bool:
        """True when the block after the cached prefix could be hit but a running request is
        computing it right now: admitting later lets the request share it instead of recomputing."""
        if not self._pending or num_cached_blocks >= (state.num_tokens - 1) // self.block_size:
            return False
        return state.block_hashes[num_cached_blocks] in self._pending

    def admit(self, state: RequestState, cached_blocks: list[int], num_new_tokens: int) -> bool:
        """Give a waiting request a table: the shared cached blocks plus fresh blocks for the
        `num_new_tokens` after them. Returns False (and changes nothing) when blocks are short."""
        assert state.request_id not in self._tables, f"{state.request_id} already holds blocks"
        num_cached_tokens = len(cached_blocks) * self.block_size
        num_needed = self.blocks_for_tokens(num_cached_tokens + num_new_tokens) - len(cached_blocks)
        # Sharing a cached block that sits in the evictable set takes it out of the available count.
        num_revived = sum(1 for block in cached_blocks if self.pool.is_evictable(block))
        if num_needed > self.pool.num_available - num_revived:
            return False
        self.pool.share(cached_blocks)
        table = _BlockTable(block_ids=cached_blocks + self.pool.allocate(num_needed))
        table.num_committed = table.pending_end = len(cached_blocks)
        self._tables[state.request_id] = table
        if self.enable_prefix_caching:
            self._register_pending(state, table)
        return True

    def grow(self, state: RequestState, num_new_tokens: int) -> bool:
        """Extend a running request's table to cover `num_new_tokens` past its computed ones.
        Returns False (and changes nothing) when blocks are short."""
        table = self._tables[state.request_id]
        num_needed = self.blocks_for_tokens(state.num_computed_tokens + num_new_tokens) - len(table.block_ids)
        if num_needed <= 0:
            return True
        if num_needed > self.pool.num_available:
            return False
        table.block_ids.extend(self.pool.allocate(num_needed))
        return True

    def commit_computed(self, state: RequestState) -> None:
        """Offer the request's newly computed full blocks to the prefix cache (each block once)."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[state.request_id]
        num_full = state.num_computed_tokens // self.block_size
        if num_full <= table.num_committed:
            return
        self._extend_hashes(state, num_full)
        for index in range(table.num_committed, num_full):
            block_hash = state.block_hashes[index]
            # A duplicate (same content computed twice concurrently) stays uncached and is freed later.
            self.pool.cache(table.block_ids[index], block_hash)
            if index < table.pending_end:
                self._unpend(block_hash)
        table.num_committed = num_full

    def free(self, state: RequestState) -> None:
        """Release the request's blocks (finish, abort or preemption); no-op if it holds none."""
        table = self._tables.pop(state.request_id, None)
        if table is None:
            return
        for index in range(table.num_committed, table.pending_end):
            self._unpend(state.block_hashes[index])
        # Tail first: deeper blocks of a prefix become the first to be evicted.
        self.pool.release(reversed(table.block_ids))

    def _register_pending(self, state: RequestState, table: _BlockTable) -> None:
        num_full = state.num_tokens // self.block_size
        self._extend_hashes(state, num_full)
        for index in range(table.num_committed, num_full):
            block_hash = state.block_hashes[index]
            self._pending[block_hash] = self._pending.get(block_hash, 0) + 1
        table.pending_end = max(num_full, table.num_committed)

    def _unpend(self, block_hash: BlockHash) -> None:
        remaining = self._pending[block_hash] - 1
        if remaining:
            self._pending[block_hash] = remaining
        else:
            del self._pending[block_hash]

    def _extend_hashes(self, state: RequestState, num_blocks: int) -> None:
        """Hash the request's full blocks up to `num_blocks`; earlier hashes are kept, never redone."""
        hashes, tokens, size = state.block_hashes, state.all_token_ids, self.block_size
        while len(hashes) < num_blocks:
            index = len(hashes)
            if hashes:
                parent = hashes[-1]
            else:
                parent = self._long_rope_root_hash if state.long_rope else self._root_hash
            hashes.append(hash_block(parent, tokens[index * size : (index + 1) * size]))
