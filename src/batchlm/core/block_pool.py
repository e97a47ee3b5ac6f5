"""The KV-cache block pool: free list, reference counts, and the prefix cache's hash -> block map."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence

# A full block's identity: SHA-256 over its parent's hash and its token ids. A cryptographic hash
# rather than Python's hash() so that no prompt can be crafted to collide with another user's block.
BlockHash = bytes


def root_block_hash(salt: str) -> BlockHash:
    """The parent hash of every request's first block; the salt (model/adapter identity) keeps
    caches of different weights apart."""
    return hashlib.sha256(b"batchlm-prefix-root\0" + salt.encode()).digest()


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """Chain one full block's tokens onto its parent's hash."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockPool:
    """Owns every block id in [0, num_blocks). A block is in exactly one of three states:

    - free: ref count 0, no hash, in the free list;
    - evictable: ref count 0 but holds a cached full block (hash kept), in the LRU set;
    - used: ref count > 0 (held by that many request block tables).

    Allocation takes from the free list first and evicts the least recently released cached block
    only when the free list is empty. Every operation is O(blocks touched), never O(num_blocks).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._hash_of_block: list[BlockHash | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # Insertion order = release order: the first entry is the least recently used.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[BlockHash, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks on the free list (no cached content)."""
        return len(self._free)

    @property
    def num_evictable(self) -> int:
        """Unreferenced blocks that still hold cached content."""
        return len(self._evictable)

    @property
    def num_available(self) -> int:
        """Blocks an allocation can get right now (free + evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_available

    def allocate(self, count: int) -> list[int]:
        """Take `count` blocks (ref count 1 each); raises if fewer are available (callers check first)."""
        if count > self.num_available:
            raise RuntimeError(f"asked for {count} KV blocks but only {self.num_available} are available")
        blocks = [self._take_one() for _ in range(count)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def _take_one(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)
        stale_hash = self._hash_of_block[block]
        assert stale_hash is not None, f"evictable block {block} has no hash"
        del self._cached[stale_hash]
        self._hash_of_block[block] = None
        return block

    def share(self, blocks: Iterable[int]) -> None:
        """Add a reference to cached blocks found by a prefix lookup (revives evictable ones)."""
        for block in blocks:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block. Unreferenced cached blocks become evictable, most
        recently used last, so callers release a table tail-first to keep shared prefixes longest."""
        for block in blocks:
            count = self._ref_counts[block]
            if count <= 0:
                raise RuntimeError(f"double free of KV block {block}")
            self._ref_counts[block] = count - 1
            if count > 1:
                continue
            if self._hash_of_block[block] is None:
                self._free.append(block)
            else:
                self._evictable[block] = None

    def cache(self, block: int, block_hash: BlockHash) -> bool:
        """Register a used, fully computed block under its hash. Returns False (block left uncached)
        when another block already holds the same content, so each hash maps to one block."""
        if block_hash in self._cached:
            return self._cached[block_hash] == block
        assert self._ref_counts[block] > 0, f"caching unreferenced block {block}"
        assert self._hash_of_block[block] is None, f"block {block} is cached twice"
        self._cached[block_hash] = block
        self._hash_of_block[block] = block_hash
        return True

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block holding this content, or None."""
        return self._cached.get(block_hash)

    def is_evictable(self, block: int) -> bool:
        return self._ref_counts[block] == 0 and block in self._evictable

    # Introspection for tests and debugging: O(num_blocks), never called on the hot path.

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def free_blocks(self) -> Iterator[int]:
        return iter(self._free)

    def evictable_blocks(self) -> Iterator[int]:
        """Evictable blocks in eviction order (least recently used first)."""
        return iter(self._evictable)

    def block_hash(self, block: int) -> BlockHash | None:
        return self._hash_of_block[block]
