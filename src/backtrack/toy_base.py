"""Placeholder: the stage is being written."""

from __future__ import annotations

from dataclasses import dataclass

from backtrack.config import CommonConfig


@dataclass
class ToyBaseConfig(CommonConfig):
    """Not implemented yet."""


def main(config: ToyBaseConfig) -> None:
    raise NotImplementedError("toy_base")
