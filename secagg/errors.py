"""Errors raised by the secure-summation protocols.

Every error says what went wrong *and* what to do about it; none of them ever leaves a partial or
silently wrong sum behind.
"""

from __future__ import annotations

__all__ = [
    "AbortError",
    "CodecError",
    "KeyMismatchError",
    "OverflowRiskError",
    "ProtocolError",
    "SecAggError",
]


class SecAggError(Exception):
    """Base class of every error raised by :mod:`secagg`."""


class ProtocolError(SecAggError):
    """A message is malformed, out of phase, replayed, or asks an honest party to break the protocol.

    Honest clients raise it instead of answering (e.g. an unmask request that names a client both alive
    and dropped); servers raise it for messages that do not belong to the current session/round/phase.
    """


class AbortError(SecAggError):
    """Too few parties answered a phase for the protocol to finish safely; the round produces no sum."""

    def __init__(self, phase: str, *, needed: int, answered: int, reason: str | None = None) -> None:
        self.phase = phase
        self.needed = needed
        self.answered = answered
        self.reason = reason
        if reason is not None:  # e.g. too few *valid* shares: some client sent wrong ones
            super().__init__(f"round aborted in phase {phase!r}: {reason}")
            return
        super().__init__(
            f"round aborted in phase {phase!r}: {answered} client(s) answered but at least {needed} are "
            f"needed (the threshold t). Lower the threshold, sample a larger cohort, or lengthen the "
            f"phase deadline so that fewer clients count as dropped."
        )


class OverflowRiskError(SecAggError):
    """Quantization could wrap around the modulus for the planned cohort, or a value is out of range."""


class KeyMismatchError(SecAggError):
    """A ciphertext or message was produced under a different key or session than expected."""


class CodecError(SecAggError):
    """Bytes could not be decoded into a protocol message (truncated, tampered, wrong version)."""
