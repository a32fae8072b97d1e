"""Encrypted packed vectors: :class:`CiphertextBatch` and the three operations on it, run on a process pool.

:func:`encrypt_vector`, :func:`add_batches` and :func:`decrypt_vector` split their ciphertexts into chunks
and run them on a cached ``ProcessPoolExecutor`` (``workers=None``: all cores; small jobs and ``workers=1``
stay in-process): pure computation behind a function call, so the machines stay sans-IO.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from secagg.errors import CodecError, KeyMismatchError, OverflowRiskError, ProtocolError
from secagg.paillier import _fast as fast
from secagg.paillier.keys import PaillierPrivateKey, PaillierPublicKey
from secagg.paillier.packing import PackingPlan

__all__ = ["CiphertextBatch", "Randomness", "add_batches", "decrypt_vector", "encrypt_vector"]

Randomness = Literal["fixed-base", "full"]


@dataclass(frozen=True, slots=True)
class CiphertextBatch:
    """A packed encrypted vector (or a sum of ``summands`` of them) under the key named by ``fingerprint``.

    ``data``: the ciphertexts as fixed-width big-endian integers mod ``n^2``. ``digest``: SHA-256 over
    every other field, so truncation and corruption in transit fail loudly (it is not a MAC: whoever
    alters the batch can recompute it).
    """

    fingerprint: bytes
    size: int
    value_bits: int
    capacity: int  # K: the planned number of summands (sets the slot width)
    summands: int
    data: bytes
    digest: bytes = b""

    def compute_digest(self) -> bytes:
        h = hashlib.sha256(b"privagg/paillier/batch/v1")
        for x in (self.size, self.value_bits, self.capacity, self.summands, len(self.data)):
            h.update(x.to_bytes(8, "big"))
        h.update(self.fingerprint)
        h.update(self.data)
        return h.digest()

    def sealed(self) -> CiphertextBatch:
        return CiphertextBatch(
            self.fingerprint,
            self.size,
            self.value_bits,
            self.capacity,
            self.summands,
            self.data,
            self.compute_digest(),
        )

    def check(self, public: PaillierPublicKey, plan: PackingPlan | None = None) -> None:
        """Raise ``KeyMismatchError``/``CodecError``/``ProtocolError`` unless this batch is well formed
        for ``public`` (and ``plan``)."""
        if self.fingerprint != public.fingerprint:
            raise KeyMismatchError(
                f"ciphertext batch was encrypted under key {self.fingerprint.hex()} but this party uses key "
                f"{public.fingerprint.hex()}: distribute the current public key to every client and "
                f"re-encrypt (keys change when a new PaillierSum or key pair is created)"
            )
        if self.digest != self.compute_digest():
            raise CodecError("ciphertext batch digest mismatch: the batch was truncated or tampered with in transit")
        if plan is not None and (self.value_bits, self.capacity) != (plan.value_bits, plan.summands):
            raise ProtocolError(
                f"batch packed for value_bits={self.value_bits}, K={self.capacity} but the round expects "
                f"value_bits={plan.value_bits}, K={plan.summands}: every party must use the same plan"
            )
        if not 1 <= self.summands <= self.capacity:
            raise OverflowRiskError(f"batch claims {self.summands} summands, outside [1, {self.capacity}]")
        p = plan or PackingPlan.for_key(public, value_bits=self.value_bits, summands=self.capacity)
        expected = p.ciphertexts(self.size) * public.ciphertext_bytes
        if len(self.data) != expected:
            raise CodecError(
                f"ciphertext batch has {len(self.data)} bytes, expected {expected} for {self.size} values: "
                f"it was truncated; ask the sender to resend"
            )


def _plan_of(batch: CiphertextBatch, public: PaillierPublicKey) -> PackingPlan:
    return PackingPlan.for_key(public, value_bits=batch.value_bits, summands=batch.capacity)


def encrypt_vector(
    values: NDArray[Any],
    public: PaillierPublicKey,
    plan: PackingPlan,
    *,
    randomness: Randomness = "fixed-base",
    workers: int | None = None,
    window: int = fast.DEFAULT_WINDOW,
    exponents_for_testing: Sequence[int] | None = None,
) -> CiphertextBatch:
    """Pack and encrypt signed integers ``values`` (``|v| <= plan.offset``) as one summand.

    ``workers``: processes (``None`` = all cores); small inputs stay in-process. ``exponents_for_testing``
    is the named test seam for known-answer tests: one fixed ``a`` (fixed-base) or ``r`` (full) per
    ciphertext instead of fresh CSPRNG draws.
    """
    if plan.key_bits != public.bits:
        raise KeyMismatchError(f"plan was made for a {plan.key_bits}-bit key, this key has {public.bits} bits")
    if randomness not in ("fixed-base", "full"):
        raise ValueError(f"randomness must be 'fixed-base' or 'full', got {randomness!r}")
    encoded = plan.encode(values)  # OverflowRiskError here, before any encryption
    size = int(np.asarray(values).size)
    count = plan.ciphertexts(size)
    if exponents_for_testing is not None and len(exponents_for_testing) != count:
        raise ValueError(f"exponents_for_testing needs {count} entries (one per ciphertext)")
    nworkers = fast.resolve_workers(workers)
    per_ct = 0.0003 if randomness == "fixed-base" else 0.02
    bounds = fast.chunk_bounds(count, workers=nworkers, min_chunk=64)
    h = public.fixed_base if randomness == "fixed-base" else 0
    jobs = [
        fast.EncryptJob(
            n=public.n,
            h=h,
            randomness=randomness,
            exp_bits=public.exponent_bits,
            window=window,
            slots=plan.slots,
            slot_bits=plan.slot_bits,
            width=public.ciphertext_bytes,
            encoded=encoded[a * plan.slots : b * plan.slots],
            exponents=None if exponents_for_testing is None else tuple(exponents_for_testing[a:b]),
        )
        for a, b in bounds
    ]
    parts = fast.run_jobs(fast.encrypt_job, jobs, workers=nworkers, seconds=per_ct * count)
    batch = CiphertextBatch(public.fingerprint, size, plan.value_bits, plan.summands, 1, b"".join(parts))
    return batch.sealed()


def add_batches(
    batches: Sequence[CiphertextBatch], public: PaillierPublicKey, *, workers: int | None = None
) -> CiphertextBatch:
    """Homomorphic sum (ciphertext products mod ``n^2``); needs no private key.

    Every batch is checked (key fingerprint, digest, length, plan); the total number of summands may not
    exceed the planned ``K`` (``OverflowRiskError``): a sum beyond it could carry between slots.
    """
    if not batches:
        raise ValueError("add_batches needs at least one batch")
    first = batches[0]
    plan = _plan_of(first, public)
    for b in batches:
        b.check(public, plan)
        if b.size != first.size:
            raise ProtocolError(f"cannot add batches of {first.size} and {b.size} values")
    total = sum(b.summands for b in batches)
    if total > plan.summands:
        raise OverflowRiskError(
            f"refusing to add {total} summands: the packing was planned for at most {plan.summands} "
            f"(slot headroom); plan the cohort size K for every client that can take part"
        )
    if len(batches) == 1:
        return first
    width = public.ciphertext_bytes
    count = len(first.data) // width
    nworkers = fast.resolve_workers(workers)
    bounds = fast.chunk_bounds(count, workers=nworkers, min_chunk=256)
    jobs = [fast.AddJob(public.n, width, tuple(b.data[a * width : e * width] for b in batches)) for a, e in bounds]
    seconds = 1e-5 * count * len(batches)
    parts = fast.run_jobs(fast.add_job, jobs, workers=nworkers, seconds=seconds)
    out = CiphertextBatch(public.fingerprint, first.size, first.value_bits, first.capacity, total, b"".join(parts))
    return out.sealed()


def decrypt_vector(
    batch: CiphertextBatch, private: PaillierPrivateKey, *, workers: int | None = None
) -> NDArray[np.int64]:
    """The exact signed integer sum of the ``batch.summands`` vectors in ``batch`` (CRT decryption).

    Raises ``KeyMismatchError`` for another key and ``CodecError`` when the range checks fail.
    """
    public = private.public
    plan = _plan_of(batch, public)
    batch.check(public, plan)
    width = public.ciphertext_bytes
    count = len(batch.data) // width
    nworkers = fast.resolve_workers(workers)
    bounds = fast.chunk_bounds(count, workers=nworkers, min_chunk=16)
    jobs = [
        fast.DecryptJob(private.p, private.q, width, plan.slots, plan.slot_bits, batch.data[a * width : e * width])
        for a, e in bounds
    ]
    per_ct = 5e-3 * (public.bits / 2048) ** 2.6
    parts = fast.run_jobs(fast.decrypt_job, jobs, workers=nworkers, seconds=per_ct * count)
    slot_sums = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    return plan.decode(slot_sums, size=batch.size, count=batch.summands)
