"""Packed toy-base batches train on exactly what padded ones do: same loss, same gradients."""

from __future__ import annotations

import pytest

from backtrack.tasks import get_task
from backtrack.toy_base import ToyBaseConfig, build_model, train_tokenizer
from backtrack.toy_corpus import TranscriptDataset, build_corpus, loss_kinds
from backtrack.toy_packing import PackingCollator, pack_rows


def test_pack_rows_places_every_transcript_once_within_the_row_length():
    lengths = [90, 120, 80, 100, 140, 77, 130, 95]
    rows = pack_rows(lengths, 256)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert len(rows) == 4  # 932 tokens: four rows of 256 hold them, first fit finds it
    assert pack_rows([300, 10], 256) == [[0], [1]]  # too long for a row: a row of its own


@pytest.mark.parametrize("rows_per_longest", [1.5, 3.0])
def test_packed_batch_gives_the_padded_loss_and_gradients(rows_per_longest):
    import torch
    from transformers import DataCollatorForSeq2Seq

    torch.set_num_threads(1)
    config = ToyBaseConfig(layers=2, hidden=32, heads=2, intermediate=64, correction_rate=0.5)
    task = get_task("arith")
    corpus = build_corpus(task, config, 200)
    tokenizer = train_tokenizer(task, corpus, 300)
    tokenizer.padding_side = "right"
    features = [TranscriptDataset(tokenizer, corpus, loss_kinds(config))[i] for i in range(12)]
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(features)
    longest = max(len(f["input_ids"]) for f in features)
    packed = PackingCollator(tokenizer.pad_token_id, int(rows_per_longest * longest))(features)
    real = sum(len(f["input_ids"]) for f in features)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert (packed["labels"] != -100).sum() == (padded["labels"] != -100).sum()
    assert (packed["input_ids"] != tokenizer.pad_token_id).sum() == real
    model = build_model(tokenizer, config).to(torch.float64)  # compare math, not rounding

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(padded)
    packed_loss, packed_grads = loss_and_grads(packed)
    assert packed_loss == pytest.approx(loss, rel=1e-10)
    for grad, packed_grad in zip(grads, packed_grads):
        assert torch.allclose(grad, packed_grad, rtol=1e-8, atol=1e-12)
    # Without the restarting positions the rows are one causal sequence: attention leaks.
    leaky = {k: v for k, v in packed.items() if k != "position_ids"}
    assert abs(loss_and_grads(leaky)[0] - loss) > 1e-4
