"""Arms without training: the base model, and s1-style budget forcing on it at inference."""

from __future__ import annotations

from backtrack.arms import Arm, register

register(Arm("base", "the recipe's model as it is", parent=None))
register(Arm("budget_forcing", "base model with s1 budget forcing at inference (no checking)",
             parent="base", protocol="forcing", compare_with=("base",)))
