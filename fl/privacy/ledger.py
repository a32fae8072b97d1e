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
        """What holds for the model as released: the preprocessing entries, then the most recent round's.

        The preprocessing (round 0, ``stage="preprocessing"``) shaped every later round, so its guarantee
        stays part of what the released model carries."""
        pre = [g for e in self.entries if e.get("stage") == "preprocessing" for g in e["guarantees"]]
        rounds = [e for e in self.entries if e.get("stage") != "preprocessing"]
        return pre + (list(rounds[-1]["guarantees"]) if rounds else [])

    def as_list(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self.entries]
