"""The embedding job's building blocks on hand-built inputs (tests/test_embed.py runs the job on a trained LM, e2e):
stable user shards, 16-bit rounding as torch rounds, token-bounded batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lum.embed import token_batches
from lum.embed_job import round_to_dtype, shard_of


def test_shards_are_stable_cover_every_user_and_split_them_roughly_evenly():
    users = np.array([f"user-{i}" for i in range(4000)], dtype=object)
    shards = shard_of(users, 8)
    assert shards.dtype == np.int64 and set(shards.tolist()) == set(range(8))
    assert np.bincount(shards).min() > 4000 / 8 * 0.8  # a hash, not a range: no shard far below its share
    # the same user, the same shard: in another call, order or batch (each process of a sharded job computes its own)
    assert (shard_of(users[::-1], 8)[::-1] == shards).all() and shard_of(np.array(["user-17"], dtype=object), 8)[0] == shards[17]
    assert (shard_of(users, 1) == 0).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_rounding_matches_torch_and_float32_is_unchanged(dtype):
    rng = np.random.default_rng(0)
    matrix = np.concatenate([rng.normal(size=(50, 8)), rng.normal(scale=1e-3, size=(10, 8)), [[1 + 2**-8, 1 + 3 * 2**-8] * 4]]).astype(np.float32)
    rounded = round_to_dtype(matrix, dtype)
    expected = torch.from_numpy(matrix).to(getattr(torch, dtype)).float().numpy()
    assert rounded.dtype == np.float32 and np.array_equal(rounded, expected)
    assert not np.array_equal(rounded, matrix)  # it did round
    assert np.array_equal(round_to_dtype(rounded, dtype), rounded)  # 16-bit values stay as they are
    assert np.array_equal(round_to_dtype(matrix, "float32"), matrix)


def test_token_batches_cover_every_row_once_by_size_within_the_padded_budget():
    sizes = [5, 30, 12, 7, 100, 12, 1]
    batches = list(token_batches(sizes, max_batch_tokens=40))
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    flat = [i for b in batches for i in b]
    assert [sizes[i] for i in flat] == sorted(sizes)  # by increasing size: little padding
    for batch in batches:
        assert len(batch) * max(sizes[i] for i in batch) <= 40 or len(batch) == 1  # a longer row alone: a batch of its own
    assert [100] in [[sizes[i] for i in b] for b in batches]
    assert list(token_batches(sizes, 40, rows=[4, 0])) == [[0], [4]]  # only the rows asked for
    assert list(token_batches([], 40)) == []
