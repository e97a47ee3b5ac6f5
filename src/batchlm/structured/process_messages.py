"""The typed messages between the engine and its grammar mask process (structured.mask_process):
what starts the child, the calls it answers and the messages it applies in order, and its answers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from batchlm.config import EngineConfig
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import GrammarBackend

# SharedWords' layout: LANDED and WRITTEN (uint32), then WRITTEN's time (float64).
SHARED_WORDS_BYTES = 16
LANDED_WORD = 0
WRITTEN_WORD = 1
# Tokens that have not landed by then never will: the call fails.
LANDING_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class BackendSpec:
    """What building the engine's grammar backend takes (structured.factory's arguments)."""

    config: EngineConfig
    model_dir: Path
    vocab_size: int
    on_accelerator: bool
    eos_token_ids: tuple[int, ...]
    log_level: int


# Builds the real backend in the child: a module-level function, which travels by its name.
BuildBackend = Callable[[BackendSpec], GrammarBackend]


@dataclass(frozen=True)
class Start:
    """The child's first message; words: the SharedWords segment, if the engine made one."""

    spec: BackendSpec
    build: BuildBackend
    words: str | None = None
    landing_timeout_s: float = LANDING_TIMEOUT_S


# Messages to the child. Only a Call is answered; the others take effect in order before later calls.


@dataclass(frozen=True)
class NewMatcher:
    """A matcher at the start of `spec`'s grammar (one that does not compile ends its sequence)."""

    matcher_id: int
    spec: StructuredOutputs


@dataclass(frozen=True)
class NewBatch:
    """These matchers prepared as the rows of a decode batch."""

    batch_id: int
    matcher_ids: tuple[int, ...]


@dataclass(frozen=True)
class Forget:
    """Stand-ins gone on the engine's side, and shared segments it no longer writes through."""

    matcher_ids: tuple[int, ...] = ()
    batch_ids: tuple[int, ...] = ()
    segments: tuple[str, ...] = ()


@dataclass(frozen=True)
class MaskTarget:
    """Where to write [rows, words] int32 masks: a byte offset into a shared segment."""

    segment: str
    offset: int
    rows: int


@dataclass(frozen=True)
class LandedTokens:
    """A step's sampled token ids, int64 [count] at a byte offset of a shared segment, there once
    SharedWords' LANDED word reaches `ticket`."""

    segment: str
    offset: int
    count: int
    ticket: int


@dataclass(frozen=True)
class Call:
    """Advance, then fill, then report: rows are a prepared batch (batch_id, one token each in
    `one_each`) or matchers by id (`new_tokens`, any number each)."""

    batch_id: int | None = None
    matcher_ids: tuple[int, ...] = ()
    one_each: list[int] | None = None
    new_tokens: list[list[int]] | None = None
    fill: MaskTarget | None = None
    ask_terminated: bool = False
    # A batch's tokens to wait for instead of one_each: those at `token_rows` of the landed ones.
    landed: LandedTokens | None = None
    token_rows: tuple[int, ...] = ()
    # Set SharedWords' WRITTEN word to this once the masks are written (a device's stream waits for it).
    release: int | None = None


@dataclass(frozen=True)
class Stop:
    pass


ToChild = NewMatcher | NewBatch | Forget | Call | Stop


# Messages from the child.


@dataclass(frozen=True)
class Ready:
    bitmask_words: int
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Answer:
    """The call's rows (by index) whose grammar rejected a token, and (if asked) whether each row's
    grammar is done."""

    rows: int
    rejected: tuple[int, ...] = ()
    terminated: tuple[bool, ...] = ()

    @property
    def accepted(self) -> list[bool]:
        accepted = [True] * self.rows
        for row in self.rejected:
            accepted[row] = False
        return accepted


@dataclass(frozen=True)
class Failed:
    message: str


FromChild = Ready | Answer | Failed


# Whether one 32-bit counter has reached a ticket, as CUDA's stream waits compare (the counter may wrap).
def reached(counter: int, ticket: int) -> bool:
    return ((counter - ticket) & 0xFFFFFFFF) < 0x80000000
