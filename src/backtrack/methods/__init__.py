"""Built-in methods: each module registers its arms (`backtrack.arms.register`).

Adding a method = adding a module here and importing it below (see docs/DESIGN.md).
"""

from backtrack.methods import baseline, confirm, controls, retry_data, rft, rl, s2r  # noqa: F401
