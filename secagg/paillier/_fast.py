"""The Paillier hot path: encryption with g = n+1 and fixed-base randomness, CRT decryption, and a
process pool that spreads both over all cores.

Nothing here knows about protocols or messages; :mod:`secagg.paillier` owns the public API, the key
objects and the security argument. Jobs are module-level functions on plain ints/bytes/arrays so that
they pickle to worker processes; each worker caches the fixed-base table it builds for a key.

Cost model (2048-bit n, one core): a multiplication mod n^2 is ~8 us, so a fixed-base r^n with a
224-bit exponent and 8-bit windows is 27 multiplications (~0.2 ms) instead of a 2048-bit powmod
(~15 ms); CRT decryption is two 1024-bit-exponent powmods mod p^2 and q^2 (~5 ms) instead of one
2048-bit-exponent powmod mod n^2 (~15+ ms).
"""

from __future__ import annotations

import atexit
import math
import os
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool as BrokenExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import gmpy2
import numpy as np
from numpy.typing import NDArray

from secagg.errors import CodecError
from secagg.paillier.packing import pack, unpack

__all__ = [
    "DEFAULT_WINDOW",
    "FixedBaseTable",
    "Randomness",
    "add_job",
    "crt_decrypt",
    "decrypt_job",
    "encrypt_job",
    "raw_encrypt",
    "run_jobs",
]

Randomness = Literal["fixed-base", "full"]
DEFAULT_WINDOW = 8
_Mpz = Any  # gmpy2.mpz (untyped)
T = TypeVar("T")
R = TypeVar("R")


def raw_encrypt(n: int, m: int, rn: int) -> int:
    """``(1 + m n) * rn mod n^2`` with g = n+1: ``g^m = 1 + m n (mod n^2)``, no exponentiation.

    Computed as ``rn + n * (m * rn mod n)`` (one product reduced mod n instead of mod n^2).
    """
    nn = gmpy2.mpz(n)
    n2 = nn * nn
    r = gmpy2.mpz(rn)
    return int((r + nn * ((gmpy2.mpz(m) * r) % nn)) % n2)


class FixedBaseTable:
    """Windowed fixed-base exponentiation mod ``n^2``: ``h^a`` with only multiplications.

    ``rows[i][j] = h^(j * 2^(w i)) mod n^2`` for ``j < 2^w``; ``h^a`` is the product of one entry per
    ``w``-bit digit of ``a`` -- ``ceil(exp_bits / w) - 1`` multiplications for an ``exp_bits``-bit ``a``.
    """

    __slots__ = ("exp_bits", "n2", "rows", "window")

    def __init__(self, h: int, n2: int, *, exp_bits: int, window: int = DEFAULT_WINDOW) -> None:
        if not 1 <= window <= 16:
            raise ValueError(f"window must be in [1, 16], got {window}")
        self.n2 = gmpy2.mpz(n2)
        self.exp_bits = exp_bits
        self.window = window
        size = 1 << window
        base = gmpy2.mpz(h) % self.n2
        rows: list[list[_Mpz]] = []
        for _ in range(math.ceil(exp_bits / window)):
            row = [gmpy2.mpz(1), base]
            for _ in range(size - 2):
                row.append(row[-1] * base % self.n2)
            rows.append(row)
            base = row[-1] * base % self.n2  # h^(2^(w (i+1)))
        self.rows = rows

    def power(self, a: int) -> _Mpz:
        """``h^a mod n^2`` for ``0 <= a < 2^exp_bits``."""
        if not 0 <= a < (1 << self.exp_bits):
            raise ValueError(f"exponent must be in [0, 2^{self.exp_bits})")
        mask = (1 << self.window) - 1
        acc = None
        n2 = self.n2
        for i, row in enumerate(self.rows):
            digit = (a >> (self.window * i)) & mask
            if digit:
                acc = row[digit] if acc is None else acc * row[digit] % n2
        return gmpy2.mpz(1) if acc is None else acc


_TABLES: dict[tuple[int, int, int, int], FixedBaseTable] = {}


def _table(n: int, h: int, exp_bits: int, window: int) -> FixedBaseTable:
    key = (n, h, exp_bits, window)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= 4:
            _TABLES.clear()
        nn = gmpy2.mpz(n)
        table = FixedBaseTable(h, nn * nn, exp_bits=exp_bits, window=window)
        _TABLES[key] = table
    return table


@dataclass(frozen=True, slots=True)
class EncryptJob:
    """Pack and encrypt ``encoded`` (a whole number of plaintexts) under public ``n``."""

    n: int
    h: int
    randomness: Randomness
    exp_bits: int
    window: int
    slots: int
    slot_bits: int
    width: int  # bytes per ciphertext
    encoded: NDArray[np.uint64]
    exponents: tuple[int, ...] | None = None  # test seam: fixed randomness (a, or r in "full" mode)


def encrypt_job(job: EncryptJob) -> bytes:
    """Encrypt one chunk; returns the ciphertexts as fixed-width big-endian bytes."""
    plaintexts = pack(job.encoded, slots=job.slots, slot_bits=job.slot_bits)
    if job.exponents is not None and len(job.exponents) != len(plaintexts):
        raise ValueError("the test seam needs one exponent per ciphertext")
    n = gmpy2.mpz(job.n)
    n2 = n * n
    out = bytearray()
    if job.randomness == "fixed-base":
        table = _table(job.n, job.h, job.exp_bits, job.window)
        for i, m in enumerate(plaintexts):
            a = job.exponents[i] if job.exponents is not None else secrets.randbits(job.exp_bits)
            rn = table.power(a)
            c = (rn + n * ((m * rn) % n)) % n2
            out += int(c).to_bytes(job.width, "big")
    else:
        for i, m in enumerate(plaintexts):
            r = gmpy2.mpz(job.exponents[i]) if job.exponents is not None else _random_unit(n)
            rn = gmpy2.powmod(r, n, n2)
            c = (rn + n * ((m * rn) % n)) % n2
            out += int(c).to_bytes(job.width, "big")
    return bytes(out)


def _random_unit(n: _Mpz) -> _Mpz:
    """Uniform ``r`` in ``Z_n^*`` from the OS CSPRNG."""
    while True:
        r = gmpy2.mpz(secrets.randbelow(int(n) - 1) + 1)
        if gmpy2.gcd(r, n) == 1:
            return r


def _ints(data: bytes, width: int, n2: _Mpz) -> list[_Mpz]:
    """Split fixed-width ciphertext bytes into integers, each checked to lie in ``[1, n^2)``."""
    out = []
    for off in range(0, len(data), width):
        c = gmpy2.mpz.from_bytes(data[off : off + width], "big")
        if not 0 < c < n2:
            raise CodecError(
                f"ciphertext {off // width} is outside [1, n^2): the batch was tampered with or belongs to "
                f"another key; ask the client to resend it"
            )
        out.append(c)
    return out


@dataclass(frozen=True, slots=True)
class AddJob:
    """Multiply the ciphertexts of several batches position-wise (homomorphic addition)."""

    n: int
    width: int
    parts: tuple[bytes, ...]  # the same ciphertext range of each batch


def add_job(job: AddJob) -> bytes:
    n = gmpy2.mpz(job.n)
    n2 = n * n
    acc = _ints(job.parts[0], job.width, n2)
    for part in job.parts[1:]:
        for i, c in enumerate(_ints(part, job.width, n2)):
            acc[i] = acc[i] * c % n2
    return b"".join(int(c).to_bytes(job.width, "big") for c in acc)


def crt_decrypt(c: _Mpz, p: _Mpz, q: _Mpz, pp: _Mpz, qq: _Mpz, hp: _Mpz, hq: _Mpz, p_inv_q: _Mpz) -> _Mpz:
    """Paillier's CRT decryption for g = n+1: ``m mod p`` and ``m mod q`` from exponentiations mod p^2, q^2.

    ``m_p = L_p(c^(p-1) mod p^2) * h_p mod p`` with ``L_p(x) = (x-1)/p`` and
    ``h_p = L_p(g^(p-1) mod p^2)^-1 mod p``; likewise for q; then Garner's CRT.
    """
    mp = (gmpy2.powmod(c % pp, p - 1, pp) - 1) // p * hp % p
    mq = (gmpy2.powmod(c % qq, q - 1, qq) - 1) // q * hq % q
    return mp + ((mq - mp) * p_inv_q % q) * p


def crt_params(p: int, q: int) -> tuple[_Mpz, ...]:
    """``(p, q, p^2, q^2, h_p, h_q, p^-1 mod q)`` for :func:`crt_decrypt`."""
    P, Q = gmpy2.mpz(p), gmpy2.mpz(q)
    n = P * Q
    pp, qq = P * P, Q * Q
    hp = gmpy2.invert((gmpy2.powmod(n + 1, P - 1, pp) - 1) // P, P)
    hq = gmpy2.invert((gmpy2.powmod(n + 1, Q - 1, qq) - 1) // Q, Q)
    return P, Q, pp, qq, hp, hq, gmpy2.invert(P, Q)


@dataclass(frozen=True, slots=True)
class DecryptJob:
    """Decrypt and unpack one chunk of an aggregate (runs inside the key holder's own processes)."""

    p: int
    q: int
    width: int
    slots: int
    slot_bits: int
    data: bytes


def decrypt_job(job: DecryptJob) -> NDArray[np.uint64]:
    """Slot sums of each ciphertext; ``CodecError`` if a plaintext has bits above the packed slots."""
    P, Q, pp, qq, hp, hq, p_inv_q = crt_params(job.p, job.q)
    limit = gmpy2.mpz(1) << (job.slots * job.slot_bits)
    plaintexts: list[int] = []
    for k, c in enumerate(_ints(job.data, job.width, pp * qq)):
        m = crt_decrypt(c, P, Q, pp, qq, hp, hq, p_inv_q)
        if m >= limit:
            raise CodecError(
                f"decrypted plaintext {k} has bits above its {job.slots} slots: the aggregate was tampered "
                f"with, mixes keys, or holds more summands than planned; discard this round"
            )
        plaintexts.append(int(m))
    return unpack(plaintexts, slots=job.slots, slot_bits=job.slot_bits)


# -- process pool ------------------------------------------------------------------------------------

_POOLS: dict[int, ProcessPoolExecutor] = {}


def resolve_workers(workers: int | None) -> int:
    return max(1, os.cpu_count() or 1) if workers is None else max(1, int(workers))


def _pool(workers: int) -> Executor:
    pool = _POOLS.get(workers)
    if pool is None:
        pool = ProcessPoolExecutor(max_workers=workers)
        _POOLS[workers] = pool
    return pool


@atexit.register
def _shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _POOLS.clear()


def run_jobs(fn: Callable[[T], R], jobs: Sequence[T], *, workers: int, seconds: float) -> list[R]:
    """Run ``jobs`` in order; in-process when one worker is asked for or the work is small (< 0.3 s
    estimated in ``seconds``), else over a process pool (results keep the jobs' order)."""
    if workers <= 1 or len(jobs) <= 1 or seconds < 0.3:
        return [fn(j) for j in jobs]
    try:
        return list(_pool(workers).map(fn, jobs))
    except BrokenExecutor:  # a worker died (e.g. killed): retry once with a fresh pool
        _POOLS.pop(workers, None)
        return list(_pool(workers).map(fn, jobs))


def chunk_bounds(count: int, *, workers: int, min_chunk: int) -> list[tuple[int, int]]:
    """Split ``count`` items into about ``4 * workers`` contiguous chunks of at least ``min_chunk``."""
    if count == 0:
        return []
    pieces = max(1, min(4 * workers, math.ceil(count / max(1, min_chunk))))
    step = math.ceil(count / pieces)
    return [(s, min(count, s + step)) for s in range(0, count, step)]
