"""On-policy RL for self-correction: the algorithm core, rollouts and the `backtrack rl` stage."""
