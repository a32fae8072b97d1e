"""Every error :mod:`dp` raises on purpose, in one module; each message names the valid range and the fix.

Each class also derives from the builtin the code raised before (``ValueError``, ``TypeError`` or
``AssertionError``), so callers' ``except ValueError`` and tests' ``pytest.raises(AssertionError)`` keep
working; new code catches :class:`DPError` (anything dp refused) or the one class it can handle.

- :class:`PrivacyParameterError` -- epsilon, delta, noise multiplier, sigma, clip norm, sample rate, steps
  or another privacy parameter is out of its range.
- :class:`CalibrationError` -- no noise multiplier reaches the asked (epsilon, delta): relax the target.
- :class:`AccountingError` -- a ledger cannot be built or read as asked (unknown accountant, mixed
  sampling schemes, a fixed cohort without its population, an event class outside the whitelist).
- :class:`PerSampleModeError` -- the per-sample-gradient mode of DP-SGD cannot handle the model.
- :class:`InputError` -- data handed to a mechanism, DP-SGD or the CSPRNG is unusable (NaN, empty,
  mismatched lengths, a key of the wrong size).
- :class:`AuditInputError` -- an audit was set up so it cannot measure anything (too few canaries or
  scores, scores of the wrong shape, a confidence outside (0.5, 1)).
- :class:`SignatureError` -- a function handed to an audit does not take the keywords it needs.
- :class:`AuditFailedError` -- an audit proved a privacy claim false (the noise is weaker than claimed).

This module imports nothing (``dp`` stays cheap to import and free of cycles).
"""

from __future__ import annotations

__all__ = [
    "AccountingError",
    "AuditFailedError",
    "AuditInputError",
    "CalibrationError",
    "DPError",
    "InputError",
    "PerSampleModeError",
    "PrivacyParameterError",
    "SignatureError",
]


class DPError(Exception):
    """Base class of every error :mod:`dp` raises on purpose; never a silently wrong privacy guarantee."""


class PrivacyParameterError(DPError, ValueError):
    """A privacy parameter (epsilon, delta, noise multiplier, sigma, clip, sample rate, steps...) is out of range."""


class CalibrationError(DPError, ValueError):
    """No noise multiplier keeps the planned steps within the target; the message names what to relax."""


class AccountingError(DPError, ValueError):
    """A privacy ledger cannot be composed, serialized or read as asked; the message names the fix."""


class PerSampleModeError(DPError, ValueError):
    """The chosen DP-SGD per-sample-gradient mode cannot handle this model; the message names a mode that can."""


class InputError(DPError, ValueError):
    """Data given to a mechanism, DP-SGD or the CSPRNG cannot be used (NaN/Inf, empty, mismatched, wrong size)."""


class AuditInputError(DPError, ValueError):
    """An audit cannot measure anything as set up (too few canaries or scores, wrong shapes, bad confidence)."""


class SignatureError(DPError, TypeError):
    """A function handed to :mod:`dp` does not accept the keywords it must be called with."""


class AuditFailedError(DPError, AssertionError):
    """An empirical audit proved the claimed epsilon false: the noise is weaker than the accounting assumes."""
