"""Length-balanced micro-batches for the HF trainers (toy base and SFT).

transformers' `batch_rebalance` sampler draws each optimizer step's examples at random, then
splits them by length into `gradient_accumulation_steps` micro-batches; Trainer normalises the
loss by the whole step's tokens, so a step sees the same examples and gradient as one padded
batch, with less padding. On the toy model that is 1.5-1.7x tokens/s on CPU
(benchmarks/toy_base.py): shorter rows pad less and small micro-batches stay in cache.
"""

from __future__ import annotations


def with_seeded_rebalance(trainer_class):
    """A subclass of `trainer_class` whose batch_rebalance sampler shuffles with the run's
    `data_seed` (or `seed`): transformers leaves it at its own default, 42, whatever the run's
    seed, so every seed of a study would see its examples in one order."""
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    class SeededRebalance(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, BatchRebalanceSampler):
                seed = self.args.data_seed
                sampler.seed = self.args.seed if seed is None else seed
            return sampler

    SeededRebalance.__name__ = SeededRebalance.__qualname__ = trainer_class.__name__
    return SeededRebalance


def sampling_strategy(group_by_length: bool, balance_lengths: bool) -> str:
    """TrainingArguments.train_sampling_strategy for the two length options."""
    if group_by_length:
        return "group_by_length"
    return "batch_rebalance" if balance_lengths else "random"
