"""Training sequences for the behaviour LM: user segments, sequence packing, and batches.

A user's behaviours are cut into segments of at most `max_behaviours` behaviours, each starting with [BOS].
Without packing, a batch is `rows_per_batch` segments padded to the longest one. With packing (LUM cut its
pretraining from 151 h to 26 h this way), segments of several users share a row of `row_tokens` tokens; position
ids restart at 0 for every segment, which `transformers` turns into a block-diagonal causal mask, so no token
attends to another user's tokens.

Loss targets: at every position whose next token is on the item side of the vocabulary and in the same segment,
the target is that token (as an index into the item side). In id mode these are exactly the condition
positions; in semantic mode also the code positions of an item (predicting its next code).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from lum.tokenizer import BOS, PAD


@dataclass
class Batch:
    """One step's input. B rows of T tokens."""

    input_ids: torch.Tensor  # [B, T] int64
    position_ids: torch.Tensor  # [B, T] int64, restarting at 0 per segment
    attention_mask: torch.Tensor | None  # [B, T] (unpacked: 1 = real token) or None (packed: positions tell)
    targets: torch.Tensor  # [B, T] int64 index into the item side, -1 = no loss here
    real_tokens: int  # non-padding tokens

    @property
    def n_targets(self) -> int:
        return int((self.targets >= 0).sum())

    def rows(self, index: slice | list[int]) -> "Batch":
        """A sub-batch of rows (one rank's share)."""
        mask = None if self.attention_mask is None else self.attention_mask[index]
        ids = self.input_ids[index]
        return Batch(ids, self.position_ids[index], mask, self.targets[index], int((ids != PAD).sum()))


def user_segments(
    histories: dict[str, np.ndarray], tokens_per_behaviour: int, max_behaviours: int, fill: int = 1, seed: int = 0
) -> list[np.ndarray]:
    """Cut each history ([BOS] + behaviours) into segments of at most `max_behaviours` behaviours, each with [BOS].

    With `fill` > 1 every segment starts with a random number (0 to fill-1, fixed by `seed`) of extra [BOS]
    tokens: the embedding job left-fills its prompts to a multiple of `fill` tokens (see TokenizerConfig.prompt_align),
    and the model must have seen such fills. Segments are then at most fill - 1 + 1 + max_behaviours * tpb long.
    """
    rng = np.random.default_rng([seed, 7])
    step = tokens_per_behaviour * max_behaviours
    segments = []
    for user in sorted(histories):
        body = histories[user][1:]
        for start in range(0, len(body), step):
            extra = int(rng.integers(0, fill)) if fill > 1 else 0
            segments.append(np.concatenate([np.full(extra + 1, BOS), body[start : start + step]]).astype(np.int64))
    return segments


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Best-fit packing: segment indices per row, visiting segments in the given order.

    Each segment goes to the open row with the least room that still fits it (a sorted list of free space keeps
    this O(n log n)), else starts a new row.
    """
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    rows: list[list[int]] = []
    for index, length in enumerate(lengths):
        if length > row_tokens:
            raise ValueError(f"a segment of {length} tokens does not fit a row of {row_tokens} tokens")
        pos = bisect.bisect_left(free, (length, -1))
        if pos < len(free):
            room, row = free.pop(pos)
            rows[row].append(index)
            room -= length
        else:
            row = len(rows)
            rows.append([index])
            room = row_tokens - length
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def epoch_rows(segments: list[np.ndarray], row_tokens: int, packing: bool, seed: int, epoch: int) -> list[list[int]]:
    """The rows of one epoch (lists of segment indices), in a shuffled order fixed by (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(segments))
    if not packing:
        return [[int(i)] for i in order]
    rows = pack_rows([len(segments[i]) for i in order], row_tokens)
    rows = [[int(order[i]) for i in row] for row in rows]
    return [rows[i] for i in rng.permutation(len(rows))]


def make_batch(segments: list[np.ndarray], rows: list[list[int]], item_index: np.ndarray, packing: bool, row_tokens: int) -> Batch:
    """Tensors for `rows`. `item_index` [V]: item-side index of each token id, -1 for other tokens."""
    width = row_tokens if packing else max((len(segments[row[0]]) for row in rows if row), default=1)  # a row may be empty
    ids = np.full((len(rows), width), PAD, dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    tgt = np.full((len(rows), width), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            seg = segments[s]
            n = len(seg)
            ids[r, start : start + n] = seg
            pos[r, start : start + n] = np.arange(n)
            nxt = item_index[seg[1:]]
            tgt[r, start : start + n - 1] = nxt
            start += n
        pos[r, start:] = np.arange(width - start)  # padding: a separate "sequence" of its own, never a target
    input_ids = torch.from_numpy(ids)
    mask = None if packing else (input_ids != PAD).long()
    if mask is not None:
        mask[:, 0] = 1  # an empty row (see pretrain) must attend somewhere, or attention gives NaN; real rows start with [BOS]
    return Batch(input_ids, torch.from_numpy(pos), mask, torch.from_numpy(tgt), int((ids != PAD).sum()))


def plan_epochs(segments: list[np.ndarray], row_tokens: int, rows_per_batch: int, packing: bool, seed: int, epochs: int) -> list[list[list[int]]]:
    """All batches of all epochs: a list of batches, each a list of rows."""
    batches = []
    for epoch in range(epochs):
        rows = epoch_rows(segments, row_tokens, packing, seed, epoch)
        batches += [rows[i : i + rows_per_batch] for i in range(0, len(rows), rows_per_batch)]
    return batches
