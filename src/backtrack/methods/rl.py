"""On-policy RL arms (`backtrack rl`): an outcome-RL baseline and SCoRe (seed 001).

SCoRe argues that SFT on offline correction traces collapses into "get it right the first
time" and that on-policy two-attempt RL teaches real correction: Stage I maximises attempt 2's
reward under a strong KL on attempt 1, Stage II rewards both attempts with the bonus
r2 + α(r2 - r1). In the toy world attempt 2 follows the backtracking phrase in place of
`</think>` (the format the toy corpus holds); instruct models use SCoRe's instruction turn
(`rl.second_attempt: instruction`). Settings live in the recipe's `rl:` section.
"""

from __future__ import annotations

from backtrack.arms import Arm, register

register(Arm("outcome_rl", "on-policy RL, one attempt, reward = right answer (GRPO/RLOO)",
             training="rl", train_args={"method": "outcome"},
             compare_with=("base", "rft")))
register(Arm("score", "SCoRe: two-stage two-attempt on-policy RL (Stage I then Stage II)",
             training="rl", train_args={"method": "score"},
             protocol="two_attempt", compare_with=("base@two_attempt", "outcome_rl@two_attempt")))
register(Arm("score_stage1", "SCoRe Stage I alone (ablation)", training="rl",
             train_args={"method": "score_stage1"}, protocol="two_attempt",
             compare_with=("score", "base@two_attempt")))
register(Arm("outcome_rl_from_rft_bt", "outcome RL on top of rft_bt (on-policy fine-tuning of a "
             "model that already backtracks)", parent="rft_bt", training="rl",
             train_args={"method": "outcome"}, compare_with=("rft_bt",)))
