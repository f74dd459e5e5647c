"""Log-probs of a step's rows with each group's shared prompt run through the model once.

The G rollouts of a problem (2G rows for two attempts) start with the same prompt tokens. A
plain forward over the rows, as TRL's GRPOTrainer does, runs that prompt G times in the
forward and again in the backward; in the toy world the prompt is about half of each row. Here
it runs once per group: a forward over the shared prefixes fills a key/value cache, the cache
is indexed out to the group's rows (`index_select`, differentiable, so the prefix's gradient is
the sum over its rows, exactly as in the plain forward), and a second forward runs only the
rows' own tokens against it. transformers shares prefills only for generation, under
`no_grad`; nothing in it or TRL does this for a training forward, hence this module.

Layout: prefixes are right-padded (their padding follows every real token, so a causal
forward needs no mask there); row suffixes are right-padded and carry explicit positions, and
the suffix forward's mask hides the prefix padding. A scored target in suffix coordinates `j`
is the row's token at `prefix_len + 1 + j`, so `targets` are segments realigned that way. The
suffixes run in a few forwards of rows of similar length, which cuts padding (two-attempt
steps mix short attempt-1 rows with long attempt-2 rows).
"""

from __future__ import annotations

from dataclasses import dataclass

from backtrack.rl.algorithm import PAD_SEGMENT

# Suffix forwards per call: rows sorted by length and cut into this many runs, so short rows
# (attempt 1) are not padded to the longest (attempt 2 after the carried attempt 1).
MAX_BUCKETS = 4


@dataclass
class SharedBatch:
    prefix_ids: object  # [P, Wp] right-padded shared prefixes (Wp = 0: nothing shared)
    prefix_mask: object  # [P, Wp]
    owner: object  # [B] the prefix each row continues
    suffix_ids: object  # [B, Ws] right-padded, each row's tokens after its prefix
    suffix_mask: object  # [B, Ws]
    positions: object  # [B, Ws] position ids of the suffix tokens
    targets: object  # [B, Ws - 1] segment id of each scored target (PAD_SEGMENT: none)
    steps: object  # [B, Ws - 1] step index of each scored target (process rewards; -1: none)


def _common_length(rows: list[list[int]]) -> int:
    first, length = rows[0], min(len(r) for r in rows)
    for other in rows[1:]:
        length = next((i for i in range(length) if other[i] != first[i]), length)
    return length


def shared_batch(rows, groups: list, trained: set[int], pad_id: int, share: bool = True
                 ) -> SharedBatch:
    """Split `rows` (with `.ids`, `.segments`) into shared prefixes and suffixes.

    Rows with the same `groups` key share their longest common token prefix, cut so that the
    suffix starts at least one token before the row's first trained token (whose log-prob
    needs the logits of the token before it). `share=False` gives every row an empty prefix
    (the plain forward, for comparison).
    """
    import torch

    keys = list(dict.fromkeys(groups)) if share else []
    members = {k: [i for i, g in enumerate(groups) if g == k] for k in keys}
    cut = {}
    for key, idx in members.items():
        firsts = [next((p for p, s in enumerate(rows[i].segments) if s in trained),
                       len(rows[i].ids)) for i in idx]
        cut[key] = max(0, min(_common_length([rows[i].ids for i in idx]), min(firsts) - 1))
    starts = [cut[g] if share else 0 for g in groups]
    owner = [keys.index(g) if share else 0 for g in groups]
    prefixes = [rows[members[k][0]].ids[:cut[k]] for k in keys] or [[]]
    width = max(len(p) for p in prefixes)
    prefix_ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for i, ids in enumerate(prefixes):
        prefix_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        prefix_mask[i, :len(ids)] = 1
    span = max(len(r.ids) - s for r, s in zip(rows, starts))
    suffix_ids = torch.full((len(rows), span), pad_id, dtype=torch.long)
    suffix_mask = torch.zeros((len(rows), span), dtype=torch.long)
    targets = torch.full((len(rows), span), PAD_SEGMENT, dtype=torch.long)
    steps = torch.full((len(rows), span), -1, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts)):
        size = len(row.ids) - start
        suffix_ids[i, :size] = torch.tensor(row.ids[start:], dtype=torch.long)
        suffix_mask[i, :size] = 1
        targets[i, :size] = torch.tensor(row.segments[start:], dtype=torch.long)
        if row.steps is not None:
            steps[i, :size] = torch.tensor(row.steps[start:], dtype=torch.long)
    positions = torch.tensor(starts).unsqueeze(1) + torch.arange(span).unsqueeze(0)
    return SharedBatch(prefix_ids, prefix_mask, torch.tensor(owner), suffix_ids, suffix_mask,
                       positions, targets[:, 1:], steps[:, 1:])


def length_buckets(lengths: list[int], most: int = MAX_BUCKETS) -> list[list[int]]:
    """Row indices sorted by length and cut into at most `most` runs of equal count."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    count = min(most, len(order))
    return [order[len(order) * b // count:len(order) * (b + 1) // count] for b in range(count)]


def shared_logps(model, batch: SharedBatch, temperature: float = 1.0):
    """Log-probs [B, Ws - 1] of each row's next suffix token under logits / temperature
    (0 past a row's end): the prefixes run once, the suffixes in `length_buckets`."""
    import torch
    import torch.nn.functional as F

    lengths = batch.suffix_mask.sum(1).tolist()
    prefix = None
    if batch.prefix_ids.size(1):
        prefix = model(input_ids=batch.prefix_ids, use_cache=True, logits_to_keep=1
                       ).past_key_values
    parts, order = [], []
    for rows in length_buckets(lengths):
        index = torch.tensor(rows, device=batch.suffix_ids.device)
        part = _suffix_logps(model, batch, index, max(lengths[i] for i in rows), prefix,
                             temperature)
        parts.append(F.pad(part, (0, batch.suffix_ids.size(1) - 1 - part.size(1))))
        order += rows
    inverse = torch.empty(len(order), dtype=torch.long, device=batch.suffix_ids.device)
    inverse[torch.tensor(order, device=inverse.device)] = torch.arange(len(order),
                                                                        device=inverse.device)
    return torch.cat(parts)[inverse]


def _suffix_logps(model, batch: SharedBatch, index, width: int, prefix, temperature: float):
    """The rows `index` (suffixes cut to `width`) against their prefixes' cache."""
    import torch
    from transformers import DynamicCache

    ids, mask = batch.suffix_ids[index, :width], batch.suffix_mask[index, :width]
    cache = None
    if prefix is not None:
        owner = batch.owner[index]
        config = getattr(model, "module", model).config  # DDP wraps the model
        cache = DynamicCache([(layer.keys[owner], layer.values[owner]) for layer in prefix.layers],
                             config=config)
        mask = torch.cat([batch.prefix_mask[owner], mask], dim=1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=batch.positions[index, :width],
                   past_key_values=cache, use_cache=cache is not None).logits
    logits = logits[:, :-1].float() / temperature
    picked = torch.gather(logits, 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def to_device(batch: SharedBatch, device) -> SharedBatch:
    return SharedBatch(*(t.to(device) for t in vars(batch).values()))
