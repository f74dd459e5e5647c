"""backtrack: teach language models to correct themselves on verifiable tasks."""

__version__ = "0.1.0"
