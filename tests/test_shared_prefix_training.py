"""Where a training batch's shared prefix is cut (the gradient itself: test_train.py and
test_toy_base.py compare it with the plain forward's)."""

import pytest

torch = pytest.importorskip("torch")

from backtrack.shared_prefix_training import shared_prefix_length  # noqa: E402


def _batch(rows, scored_from):
    """Right-padded ids (0 = pad) with labels scored from `scored_from[i]` on."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, first) in enumerate(zip(rows, scored_from)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, first:len(row)] = ids[i, first:len(row)]
    return ids, mask, labels


def test_cut_is_the_common_unscored_start():
    rows = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 9, 9], [1, 2, 3, 4, 5, 6, 7, 7, 7, 7]]
    assert shared_prefix_length(*_batch(rows, [8, 7, 9])) == 6
    # a label scored at position 5 is predicted from position 4, which must stay in the
    # suffix: the cut is 4
    assert shared_prefix_length(*_batch(rows, [8, 5, 9])) == 4


def test_too_little_shared_or_one_row_leaves_the_batch_alone():
    assert shared_prefix_length(*_batch([[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 9]], [5, 5])) == 0
    assert shared_prefix_length(*_batch([[1, 2, 3, 4, 5, 6, 7, 8]], [6])) == 0
    # nothing scored at all: no loss to keep equal, nothing to gain
    rows = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 8]]
    assert shared_prefix_length(*_batch(rows, [7, 7])) == 0


def test_every_row_keeps_a_token_after_the_cut():
    rows = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8]]
    assert shared_prefix_length(*_batch(rows, [6, 7])) == 5  # the shorter row keeps token 6
