"""What the engine shares with its grammar mask process besides messages: two counters in shared memory
(SharedWords) and, per step, where its sampled tokens go (TokenLanding, a slot of the process's token
ring). The runner writes the tokens and LANDED (or has its device's stream write them); the process
writes WRITTEN, which the stream waits on."""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from batchlm.structured.process_messages import LANDED_WORD, SHARED_WORDS_BYTES, WRITTEN_WORD, LandedTokens


class SharedWords:
    """Two 32-bit counters in shared memory between the engine and its mask process: LANDED, the ticket
    of the latest step whose tokens are in the token ring (written by the device's stream, or by the
    engine on a CPU), and WRITTEN, the ticket of the latest masks written (by the mask process; a
    device's stream waits for it). Made by the engine before the mask process, which attaches to it."""

    LANDED = LANDED_WORD
    WRITTEN = WRITTEN_WORD

    def __init__(self) -> None:
        self.segment = SharedMemory(create=True, size=SHARED_WORDS_BYTES)
        # Both words, as one array: a device registers them at once.
        self.words = np.ndarray((2,), dtype=np.uint32, buffer=self.segment.buf)
        self.words[:] = 0
        # When the mask process last set WRITTEN (time.perf_counter, one clock for all processes on
        # Linux): what benchmarks read to time the masks as a device would see them.
        self.written_at = np.ndarray((1,), dtype=np.float64, buffer=self.segment.buf, offset=8)
        self.written_at[0] = 0.0
        self._fence = threading.Lock()
        weakref.finalize(self, release_segment, self.segment)

    @property
    def name(self) -> str:
        return self.segment.name

    def publish(self, index: int, ticket: int) -> None:
        """Set a word once the writes before it (tokens, masks) are visible: taking and dropping a lock
        is a full memory barrier, which weakly ordered hosts (arm64) need."""
        with self._fence:
            pass
        self.words[index] = ticket & 0xFFFFFFFF


@dataclass(frozen=True)
class TokenLanding:
    """Where the engine puts a step's sampled token ids for the mask process: write `tokens`, then set
    LANDED to `where.ticket`. ring: the whole segment's array (a device page-locks it once)."""

    tokens: np.ndarray
    ring: np.ndarray
    where: LandedTokens


def release_segment(segment: SharedMemory) -> None:
    # Views into it may outlive the segment's name: the memory goes with the last of them.
    with contextlib.suppress(BufferError):
        segment.close()
    with contextlib.suppress(FileNotFoundError):
        segment.unlink()
