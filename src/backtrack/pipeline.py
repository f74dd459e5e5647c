"""Placeholder: the stage is being written."""

from __future__ import annotations

from dataclasses import dataclass

from backtrack.config import CommonConfig


@dataclass
class RunConfig(CommonConfig):
    """Not implemented yet."""


def main(config: RunConfig) -> None:
    raise NotImplementedError("pipeline")
