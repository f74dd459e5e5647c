"""A training forward that runs the prefix every row of a batch shares only once.

Every toy-base transcript starts with the same 26 tokens (the chat template's system turn and
the user turn's header): a quarter of each row, recomputed for every row in the forward and
again in the backward. Here each batch's common prefix runs once (batch of one) into a
key/value cache; the cache is expanded to the batch's rows (`expand`, whose gradient is the
sum over rows, as in the plain forward), and the rows' own tokens run against it. The loss is
the plain forward's: the cut stays before every scored label, so no scored prediction needs
the prefix's logits. The RL loop does the same per rollout group (`rl/shared_forward.py`);
neither transformers nor TRL shares a prefix in a training forward, hence this module.
"""

from __future__ import annotations

# Below this many shared tokens the extra forward costs more than it saves.
MIN_SHARED = 4


def shared_prefix_length(input_ids, attention_mask, labels) -> int:
    """Tokens every row has in common at its start (all real, none scored), such that each
    row keeps at least one token after them and the first token after them is not scored."""
    import torch

    if input_ids.size(0) < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0)
    # The label at position p is predicted from position p - 1: the cut at c needs labels
    # 0..c unscored, so the suffix's first prediction (of c + 1) has its input in the suffix.
    unscored = (labels == -100).all(0)
    if bool(unscored.all()):
        return 0  # nothing scored anywhere: leave the batch as it is
    usable = same & torch.cat([unscored[1:], unscored.new_zeros(1)])
    cut = int(usable.long().cumprod(0).sum())
    shortest = int(attention_mask.sum(1).min())
    cut = min(cut, shortest - 1)
    return cut if cut >= MIN_SHARED else 0


def split_at_shared_prefix(model, inputs: dict) -> dict:
    """`inputs` (input_ids, attention_mask, labels; right-padded) as the rows' suffixes
    against a cache of their shared prefix, or `inputs` unchanged when too little is shared."""
    import torch
    from transformers import DynamicCache

    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    cut = shared_prefix_length(ids, mask, labels)
    if not cut:
        return inputs
    rows, width = ids.shape
    prefix = model(input_ids=ids[:1, :cut], use_cache=True, logits_to_keep=1).past_key_values
    config = getattr(model, "module", model).config  # DDP wraps the model
    cache = DynamicCache([(layer.keys.expand(rows, -1, -1, -1),
                           layer.values.expand(rows, -1, -1, -1)) for layer in prefix.layers],
                         config=config)
    positions = torch.arange(cut, width, device=ids.device).unsqueeze(0).expand(rows, -1)
    return {**{k: v for k, v in inputs.items()
               if k not in ("input_ids", "attention_mask", "labels")},
            "input_ids": ids[:, cut:], "attention_mask": mask, "position_ids": positions,
            "labels": labels[:, cut:], "past_key_values": cache, "use_cache": True}


def _checkpointing(args) -> bool:
    """Activation checkpointing drops a layer's past_key_values in training (transformers'
    GradientCheckpointingLayer), which would leave the suffix without its prefix."""
    value = getattr(args, "activation_checkpointing", None)  # transformers 5's name
    return bool(getattr(args, "gradient_checkpointing", False) if value is None else value)


def with_shared_prefix(trainer_class):
    """A subclass of the HF `trainer_class` whose training loss runs each batch's shared
    prefix once (`split_at_shared_prefix`); evaluation and prediction are left as they are."""

    class SharedPrefix(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            plain = "attention_mask" in inputs and "position_ids" not in inputs  # not packed
            if model.training and plain and "labels" in inputs and not _checkpointing(self.args):
                inputs = split_at_shared_prefix(model, inputs)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    SharedPrefix.__name__ = SharedPrefix.__qualname__ = trainer_class.__name__
    return SharedPrefix
