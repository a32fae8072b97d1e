"""dp: differential-privacy mechanisms, DP-SGD, accounting and empirical audits (no federation)."""

from dp.rng import SecureRandom

__all__ = ["SecureRandom"]
