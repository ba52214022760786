"""The local loop's batch orders: length grouping keeps every example, shuffles, and pads less."""

from __future__ import annotations

import random

import pytest

from jobs.local import _batches, _length_grouped_batches


def _padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches_cover_each_epoch_once_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.choice([40, 42, 45, 80, 150, 160]) for _ in range(256)]
    n_batches = 256 // 8  # one epoch of 32 batches, sorted in windows of 4 batches
    grouped = list(_length_grouped_batches(lengths, 8, n_batches, seed=3, window=4))
    assert len(grouped) == n_batches and all(len(b) == 8 for b in grouped)
    flat = [i for b in grouped for i in b]
    assert sorted(flat) == list(range(256))  # every example once per epoch
    plain = list(_batches(256, 8, n_batches, seed=3))
    assert _padding(grouped, lengths) < 0.5 * _padding(plain, lengths)
    # the batches do not come out sorted by length: the order is still random
    means = [sum(lengths[i] for i in b) / 8 for b in grouped]
    assert means != sorted(means) and means != sorted(means, reverse=True)
    # the same seed gives the same order; more steps than an epoch start a new one
    assert list(_length_grouped_batches(lengths, 8, n_batches, seed=3, window=4)) == grouped
    assert len(list(_length_grouped_batches(lengths, 8, 3 * n_batches, seed=3, window=4))) == 3 * n_batches


def test_length_grouped_batches_need_a_full_batch():
    with pytest.raises(ValueError, match="batch_size=8"):
        list(_length_grouped_batches([1, 2, 3], 8, 1, seed=0))
