"""Turn a SchedulerOutput into the flat device tensors one model forward needs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from batchlm.attention.backend import AttentionMetadata
from batchlm.core.step_io import PLACEHOLDER_TOKEN_ID, ScheduledChunk, SchedulerOutput
from batchlm.layers.rotary import LongRopeSwitch
from batchlm.runner.block_tables import BlockTableRows
from batchlm.runner.decode_rows import all_decode_or_verify, as_decode_rows
from batchlm.runner.prompt_logprobs import PromptLogprobRows
from batchlm.runner.step_output import PreviousTokens
from batchlm.runner.upload import StepUploader


@dataclass
class StepInputs:
    """Device inputs of one forward pass, plus which rows are sampled."""

    # [T] int64 token ids, all chunks concatenated (decodes first).
    input_ids: torch.Tensor
    # [T] int64 positions the model rotates by: absolute ones, past the LongRoPE table offset for
    # the tokens of sequences under the long rotation.
    positions: torch.Tensor
    meta: AttentionMetadata
    # [S] int64: row of the last token of each chunk that samples (every row from the last known
    # token on, for a verify chunk).
    sample_indices: torch.Tensor
    # Request ids of the sampled rows, in order (a verify chunk's id once per sampled row).
    sample_request_ids: list[str]
    # True when some chunk verifies draft tokens (it samples several rows).
    has_drafts: bool = False
    # Rows whose logits give prompt logprobs (set by the runner, which knows who asked).
    prompt_logprob_rows: list[PromptLogprobRows] = field(default_factory=list)


@dataclass(frozen=True)
class PlaceholderFill:
    """Where a step's placeholder token ids come from: rows of the previous step's sampled tokens."""

    # [P] int64 on the device: the input_ids rows holding a placeholder.
    to: torch.Tensor
    # [P] int64 on the device: the row of the previous step's tokens each one takes.
    sources: torch.Tensor
    count: int

    def apply(self, input_ids: torch.Tensor, previous: PreviousTokens | None) -> None:
        """Queue the copy; on a device it must come after the previous step's sampling in the stream."""
        if self.count:
            assert previous is not None
            input_ids.index_copy_(0, self.to, previous.token_ids.index_select(0, self.sources))


class StepInputBuilder:
    """Builds each step's StepInputs, keeping what persists between steps: the requests' block-table
    rows and the upload buffers. The runner owns one and tells it which requests left (drop)."""

    def __init__(self, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        self.block_tables = BlockTableRows()
        self.uploader = StepUploader(device)
        # Steps of decodes and verify chunks with at most this many tokens are laid out as decode rows
        # (runner/decode_rows.py), so the runner's decode paths can take them; 0: never.
        self.max_decode_rows = 0
        # The model's LongRoPE switch: requests under the long rotation (NewRequestData.long_rope) feed
        # the model their positions plus its table offset, which selects the long rows.
        self.long_rope: LongRopeSwitch | None = None
        self._long_rope_ids: set[str] = set()

    def drop(self, request_ids: Iterable[str]) -> None:
        self.block_tables.drop(request_ids)
        if self._long_rope_ids:
            self._long_rope_ids.difference_update(request_ids)

    def build(self, scheduled: SchedulerOutput, previous: PreviousTokens | None = None) -> StepInputs:
        """Vectorised with numpy: Python work is O(number of chunks), not O(tokens). Placeholder token
        ids (async scheduling) are taken on the device from `previous`, the last step's sampled tokens."""
        inputs, fill = self.build_unfilled(scheduled, previous.rows if previous is not None else None)
        fill.apply(inputs.input_ids, previous)
        return inputs

    def build_unfilled(
        self, scheduled: SchedulerOutput, previous_rows: dict[str, int] | None
    ) -> tuple[StepInputs, PlaceholderFill]:
        """build(), but the placeholders are filled later (PlaceholderFill.apply, once the previous
        step's sampling is queued); previous_rows: request id -> its row among that step's tokens."""
        chunks, block_size = scheduled.chunks, self.block_size
        if self.long_rope is not None:
            self._long_rope_ids.update(new.request_id for new in scheduled.new_requests if new.long_rope)
        query_lens = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=len(chunks))
        starts = np.fromiter((c.start_position for c in chunks), dtype=np.int64, count=len(chunks))
        query_start_loc = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum(query_lens, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        seq_lens = starts + query_lens

        input_ids = np.fromiter((t for c in chunks for t in c.token_ids), dtype=np.int64, count=num_tokens)
        # Token row -> its request index, and its absolute position.
        request_of_token = np.repeat(np.arange(len(chunks)), query_lens)
        positions = np.arange(num_tokens, dtype=np.int64) + (starts - query_start_loc[:-1])[request_of_token]
        block_tables = self.block_tables.gather(chunks)  # [B, max_blocks] int32
        slot_mapping = (
            block_tables[request_of_token, positions // block_size].astype(np.int64) * block_size
            + positions % block_size
        )
        # Decodes come first: the leading run of one-token chunks.
        not_decode = np.flatnonzero(query_lens != 1)
        num_decodes = int(not_decode[0]) if not_decode.size else len(chunks)
        sample_rows = [row for row, c in enumerate(chunks) if c.sample]
        sample_indices = query_start_loc[1:][sample_rows] - 1
        sample_request_ids = [chunks[row].request_id for row in sample_rows]
        has_drafts = any(c.num_draft_tokens for c in chunks)
        if has_drafts:
            sample_indices, sample_request_ids = _verify_sample_rows(chunks, query_start_loc)
        if has_drafts and num_tokens <= self.max_decode_rows and all_decode_or_verify(chunks):
            rows = as_decode_rows(positions, request_of_token, block_tables)
            query_start_loc, seq_lens, block_tables = rows.query_start_loc, rows.seq_lens, rows.block_tables
            query_lens, num_decodes = np.ones(num_tokens, dtype=np.int64), num_tokens
        fill_rows, fill_sources = _placeholder_sources(input_ids, request_of_token, chunks, previous_rows)
        rotary_positions = self._rotary_positions(positions, request_of_token, chunks)

        slots, starts_loc, lens, tables, ids, pos, samples, fill_to, fill_from = self.uploader.upload(
            [
                slot_mapping,
                query_start_loc.astype(np.int32),
                seq_lens.astype(np.int32),
                block_tables,
                input_ids,
                rotary_positions,
                np.asarray(sample_indices, dtype=np.int64),
                fill_rows,
                fill_sources,
            ]
        )
        fill = PlaceholderFill(fill_to, fill_from, int(fill_rows.size))
        meta = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=starts_loc,
            seq_lens=lens,
            block_tables=tables,
            query_start_loc_cpu=query_start_loc.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
            max_query_len=int(query_lens.max(initial=0)),
            max_seq_len=int(seq_lens.max(initial=0)),
            num_decodes=num_decodes,
        )
        inputs = StepInputs(
            input_ids=ids,
            positions=pos,
            meta=meta,
            sample_indices=samples,
            sample_request_ids=sample_request_ids,
            has_drafts=has_drafts,
        )
        return inputs, fill

    def _rotary_positions(
        self, positions: np.ndarray, request_of_token: np.ndarray, chunks: Sequence[ScheduledChunk]
    ) -> np.ndarray:
        """The positions the model rotates by: past the LongRoPE table offset for long sequences' tokens."""
        if not self._long_rope_ids:
            return positions
        assert self.long_rope is not None
        long_ids = self._long_rope_ids
        long_chunks = np.fromiter((c.request_id in long_ids for c in chunks), dtype=bool, count=len(chunks))
        rotary: np.ndarray = positions + long_chunks[request_of_token] * self.long_rope.table_offset
        return rotary


def build_step_inputs(
    scheduled: SchedulerOutput, block_size: int, device: torch.device, previous: PreviousTokens | None = None
) -> StepInputs:
    """One step's inputs from a fresh builder (nothing kept between calls): tests and one-off forwards."""
    return StepInputBuilder(block_size, device).build(scheduled, previous)


def _verify_sample_rows(
    chunks: Sequence[ScheduledChunk], query_start_loc: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """Sampled rows when some chunks verify drafts: the last row of a plain sampling chunk, and the
    last 1 + num_draft_tokens rows of a verify chunk (the last known token and each draft)."""
    rows: list[int] = []
    request_ids: list[str] = []
    for index, chunk in enumerate(chunks):
        if not chunk.sample:
            continue
        end = int(query_start_loc[index + 1])
        count = 1 + chunk.num_draft_tokens
        rows.extend(range(end - count, end))
        request_ids.extend([chunk.request_id] * count)
    return np.asarray(rows, dtype=np.int64), request_ids


def _placeholder_sources(
    input_ids: np.ndarray,
    request_of_token: np.ndarray,
    chunks: Sequence[ScheduledChunk],
    previous_rows: dict[str, int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Token rows holding a placeholder (set to 0 on the host) and the row of the previous step's
    tokens each takes."""
    rows = np.flatnonzero(input_ids == PLACEHOLDER_TOKEN_ID)
    if not rows.size:
        return rows, rows
    input_ids[rows] = 0
    request_ids = [chunks[index].request_id for index in request_of_token[rows].tolist()]
    previous_rows = previous_rows or {}
    try:
        sources = np.fromiter((previous_rows[r] for r in request_ids), dtype=np.int64, count=len(request_ids))
    except KeyError as missing:
        raise RuntimeError(
            f"request {missing.args[0]!r} has a placeholder token but sampled nothing in the previous step"
        ) from None
    return rows, sources
