"""The privacy ledger: what each layer guaranteed in each round, to whom, under which assumptions.

Reports are generated from it, so a claim in a report is exactly a claim some layer made in code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fl.spec import Guarantee

__all__ = ["Ledger"]


@dataclass
class Ledger:
    """Append-only list of ``{"round", "guarantees", ...}`` entries."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def record(self, round: int, guarantees: Iterable[Guarantee], **facts: Any) -> None:
        self.entries.append({"round": round, "guarantees": [g.as_dict() for g in guarantees], **facts})

    def latest(self) -> list[dict[str, Any]]:
        """The guarantees of the most recent round (what holds for the model as released)."""
        return list(self.entries[-1]["guarantees"]) if self.entries else []

    def as_list(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self.entries]
