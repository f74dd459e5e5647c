"""Sequence packing for the toy base: a batch's transcripts side by side in rows, no padding.

Padding a batch to its longest transcript wastes about a third of the toy base's compute (mean
padded length 144 tokens against 105 real ones). transformers' `DataCollatorWithFlattening`
packs a whole batch into ONE row, but SDPA on CPU then computes attention over that whole row
(~6,700 tokens, 40x the work of the real attention), so this collator packs into several rows
of `row_length` tokens instead. Position ids restart at 0 for each transcript and no attention
mask and no cache (`use_cache: False`) is passed, so transformers' masking
(`find_packed_sequence_indices`, skipped when a cache exists) keeps attention within each transcript; the first label of each transcript is -100, so no token predicts the next
transcript's first token. The same transcripts, in the same order, carry the same loss as
padded (a mean over their label tokens): only floating-point rounding differs.
"""

from __future__ import annotations


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `row_length` (first fit, longest first;
    a transcript longer than a row gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fit = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if fit is None:
            rows.append([index])
            room.append(row_length - lengths[index])
        else:
            rows[fit].append(index)
            room[fit] -= lengths[index]
    return [sorted(row) for row in rows]


class PackingCollator:
    """Collates `{input_ids, labels}` features into packed rows with restarting position ids."""

    def __init__(self, pad_token_id: int, row_length: int):
        self.pad_token_id, self.row_length = pad_token_id, row_length

    def __call__(self, features: list[dict]) -> dict:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        width = max(self.row_length, max(lengths))
        rows = pack_rows(lengths, width)
        ids, labels, positions = [], [], []
        for row in rows:
            row_ids, row_labels, row_pos = [], [], []
            for index in row:
                row_ids += list(features[index]["input_ids"])
                row_labels += [-100] + list(features[index]["labels"])[1:]
                row_pos += list(range(lengths[index]))
            pad = width - len(row_ids)  # the tail is a transcript of its own, with no loss
            ids.append(row_ids + [self.pad_token_id] * pad)
            labels.append(row_labels + [-100] * pad)
            positions.append(row_pos + list(range(pad)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "position_ids": torch.tensor(positions), "use_cache": False}
