"""Placeholder: the stage is being written."""

from __future__ import annotations

from dataclasses import dataclass

from backtrack.config import CommonConfig


@dataclass
class ReportConfig(CommonConfig):
    """Not implemented yet."""


def main(config: ReportConfig) -> None:
    raise NotImplementedError("report")
