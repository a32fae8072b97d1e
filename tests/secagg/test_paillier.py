"""secagg.paillier: exact packed sums, phe interoperability, known answers, and loud failures."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phe import paillier as phe_paillier

from secagg.errors import CodecError, KeyMismatchError, OverflowRiskError, ProtocolError
from secagg.paillier import (
    CiphertextBatch,
    PackingPlan,
    PaillierPrivateKey,
    PaillierPublicKey,
    add_batches,
    decrypt_vector,
    encrypt_vector,
    generate_keypair,
    security_bits,
)
from secagg.paillier import _fast as fast
from secagg.paillier.packing import pack, unpack

# A tiny fixed key for known-answer tests: n = (2^31 - 1)(2^31 - 19), 62 bits.
KAT_P, KAT_Q = 2147483647, 2147483629
KAT_VALUES = np.array([-7, 7, 0, 3, -1, 5, 2, -6, 4, 1, -3, 6], dtype=np.int64)


@pytest.fixture(scope="module")
def keys() -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    return generate_keypair(bits=1024)


@pytest.fixture(scope="module")
def other_keys() -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    return generate_keypair(bits=1024)


def _kat_key() -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    pk = PaillierPublicKey(KAT_P * KAT_Q)
    return pk, PaillierPrivateKey(pk, KAT_P, KAT_Q)


def _cts(batch: CiphertextBatch, width: int) -> list[int]:
    return [int.from_bytes(batch.data[i : i + width], "big") for i in range(0, len(batch.data), width)]


# -- exactness ---------------------------------------------------------------------------------------


@st.composite
def _cohort(draw: st.DrawFn) -> tuple[int, list[np.ndarray]]:
    value_bits = draw(st.integers(2, 40))
    k = draw(st.integers(1, 6))
    d = draw(st.integers(0, 130))
    bound = (1 << (value_bits - 1)) - 1
    elem = st.one_of(st.sampled_from([bound, -bound, 0, 1, -1]), st.integers(-bound, bound))
    vecs = [np.array(draw(st.lists(elem, min_size=d, max_size=d)), dtype=np.int64) for _ in range(k)]
    return value_bits, vecs


@settings(max_examples=40, deadline=None)
@given(case=_cohort(), extra=st.integers(0, 3))
def test_decrypted_total_is_the_exact_integer_sum(
    keys: tuple[PaillierPublicKey, PaillierPrivateKey], case: tuple[int, list[np.ndarray]], extra: int
) -> None:
    pk, sk = keys
    value_bits, vecs = case
    plan = PackingPlan.for_key(pk, value_bits=value_bits, summands=len(vecs) + extra)  # K >= actual summands
    batches = [encrypt_vector(v, pk, plan, workers=1) for v in vecs]
    total = decrypt_vector(add_batches(batches, pk, workers=1), sk, workers=1)
    exact = [sum(int(v[i]) for v in vecs) for i in range(len(vecs[0]))]
    assert total.tolist() == exact


def test_extremes_fill_every_slot_at_full_cohort(keys: tuple[PaillierPublicKey, PaillierPrivateKey]) -> None:
    pk, sk = keys
    plan = PackingPlan.for_key(pk, value_bits=32, summands=10)
    b = plan.offset
    lo = np.full(plan.slots * 3 + 5, -b, dtype=np.int64)
    hi = np.full(plan.slots * 3 + 5, b, dtype=np.int64)
    for v in (lo, hi):
        total = decrypt_vector(add_batches([encrypt_vector(v, pk, plan)] * 10, pk), sk)
        assert np.array_equal(total, 10 * v)


def test_full_randomness_mode_and_process_pool(keys: tuple[PaillierPublicKey, PaillierPrivateKey]) -> None:
    pk, sk = keys
    plan = PackingPlan.for_key(pk, value_bits=16, summands=3)
    rng = np.random.default_rng(1)
    vecs = [rng.integers(-plan.offset, plan.offset + 1, size=25_000) for _ in range(3)]
    batches = [encrypt_vector(vecs[0], pk, plan, randomness="full", workers=2)]
    batches += [encrypt_vector(v, pk, plan, workers=2) for v in vecs[1:]]
    agg = add_batches(batches, pk, workers=2)
    total = decrypt_vector(agg, sk, workers=2)  # > 0.3 s of work: runs in the pool
    assert np.array_equal(total, vecs[0] + vecs[1] + vecs[2])
    w = pk.ciphertext_bytes
    last = len(agg.data) // w - 1  # tamper with the last ciphertext: its chunk fails inside a worker
    swapped = agg.data[: last * w] + (2).to_bytes(w, "big")  # decrypts to a ~1024-bit plaintext
    with pytest.raises(CodecError, match="bits above"):
        decrypt_vector(dataclasses.replace(agg, data=swapped).sealed(), sk, workers=2)


def test_encryption_is_randomized(keys: tuple[PaillierPublicKey, PaillierPrivateKey]) -> None:
    pk, _ = keys
    plan = PackingPlan.for_key(pk, value_bits=8, summands=2)
    v = np.arange(10)
    assert encrypt_vector(v, pk, plan).data != encrypt_vector(v, pk, plan).data


def test_2048_bit_round_trip() -> None:
    pk, sk = generate_keypair(bits=2048)
    assert pk.bits == 2048 and pk.exponent_bits == 224 and security_bits(3072) == 128
    plan = PackingPlan.for_key(pk, value_bits=32, summands=10)
    assert plan.slots == 56 and plan.slot_bits == 36
    assert pk.ciphertext_bytes / plan.slots <= 10  # bytes per value
    h = pk.fixed_base  # an n-th residue (an encryption of 0) of large order, derived from n alone
    assert sk.to_phe().raw_decrypt(h) == 0 and pow(h, 2, pk.nsquare) != 1 and h == PaillierPublicKey(pk.n).fixed_base
    rng = np.random.default_rng(2)
    vecs = [rng.integers(-plan.offset, plan.offset + 1, size=500) for _ in range(4)]
    total = decrypt_vector(add_batches([encrypt_vector(v, pk, plan) for v in vecs], pk), sk)
    assert np.array_equal(total, np.sum(vecs, axis=0))


# -- packing -----------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(slot_bits=st.integers(1, 63), slots=st.integers(1, 40), rows=st.integers(0, 4), data=st.data())
def test_pack_unpack_round_trip(slot_bits: int, slots: int, rows: int, data: st.DataObject) -> None:
    vals = data.draw(st.lists(st.integers(0, (1 << slot_bits) - 1), min_size=rows * slots, max_size=rows * slots))
    arr = np.array(vals, dtype=np.uint64)
    ms = pack(arr, slots=slots, slot_bits=slot_bits)
    assert ms == [
        sum(v << (i * slot_bits) for i, v in enumerate(vals[r * slots : (r + 1) * slots])) for r in range(rows)
    ]
    assert unpack(ms, slots=slots, slot_bits=slot_bits).tolist() == vals


def test_plan_capacity_and_slot_width() -> None:
    plan = PackingPlan(2048, 16, 10)
    assert plan.slot_bits == 16 + 4 and plan.slots == (2048 - 1 - 16) // 20
    assert PackingPlan(2048, 16, 1).slot_bits == 16
    assert PackingPlan(2048, 16, 16).slot_bits == 20 and PackingPlan(2048, 16, 17).slot_bits == 21
    with pytest.raises(OverflowRiskError, match="63"):
        PackingPlan(2048, 60, 100)


# -- phe cross-checks --------------------------------------------------------------------------------


def test_phe_sum_matches_ours(keys: tuple[PaillierPublicKey, PaillierPrivateKey]) -> None:
    pk, sk = keys
    values = [[5, -3, 1000], [-12, 7, 1], [0, 99, -1000]]
    ppk, psk = pk.to_phe(), sk.to_phe()
    phe_total = [psk.decrypt(sum(ppk.encrypt(v[i]) for v in values)) for i in range(3)]
    plan = PackingPlan.for_key(pk, value_bits=12, summands=3)
    ours = decrypt_vector(add_batches([encrypt_vector(np.array(v), pk, plan) for v in values], pk), sk)
    assert ours.tolist() == phe_total == [-7, 103, 1]


def test_our_ciphertexts_decrypt_with_phe_and_vice_versa(keys: tuple[PaillierPublicKey, PaillierPrivateKey]) -> None:
    pk, sk = keys
    psk = sk.to_phe()
    plan = PackingPlan.for_key(pk, value_bits=16, summands=1)
    width = pk.ciphertext_bytes
    # one unpacked slot: the plaintext is the offset-encoded value itself
    for v in (-plan.offset, -1, 0, 42, plan.offset):
        (c,) = _cts(encrypt_vector(np.array([v]), pk, plan), width)
        assert psk.raw_decrypt(c) == v + plan.offset
    # a full packed plaintext also decrypts with phe to the packed integer
    vals = np.arange(plan.slots) - 7
    (c,) = _cts(encrypt_vector(vals, pk, plan), width)
    assert psk.raw_decrypt(c) == pack(plan.encode(vals), slots=plan.slots, slot_bits=plan.slot_bits)[0]
    # phe's ciphertext of an offset-encoded value decrypts with our CRT path
    enc = pk.to_phe().raw_encrypt(123 + plan.offset)
    batch = CiphertextBatch(pk.fingerprint, 1, 16, 1, 1, enc.to_bytes(width, "big")).sealed()
    assert decrypt_vector(batch, sk).tolist() == [123]


def test_phe_key_round_trip_and_json(keys: tuple[PaillierPublicKey, PaillierPrivateKey]) -> None:
    pk, sk = keys
    assert PaillierPrivateKey.from_phe(sk.to_phe()).public == pk
    pub = json.loads(pk.to_json())
    assert set(pub) >= {"n"} and "p" not in pub and "q" not in pub
    assert PaillierPublicKey.from_json(pk.to_json()) == pk
    assert PaillierPublicKey.from_json({"n": pk.n}) == pk  # phe's own int-valued dict
    back = PaillierPrivateKey.from_json(sk.to_json())
    assert (back.p, back.q, back.public) == (sk.p, sk.q, pk)
    assert str(sk.p) not in repr(sk) and str(sk.q) not in repr(sk)
    with pytest.raises(ValueError, match="does not match"):
        PaillierPrivateKey(pk, sk.p, sk.q + 2)
    with pytest.raises(CodecError, match="'q'"):
        PaillierPrivateKey.from_json({"n": str(pk.n), "p": str(sk.p)})


# -- known answers -----------------------------------------------------------------------------------


def test_known_answer_fixed_base() -> None:
    pk, sk = _kat_key()
    assert pk.fingerprint.hex() == "67808c11c1a68a0264902cfa6b2f35d6"
    assert pk.fixed_base == 3989018510940544868019245340879163660
    plan = PackingPlan(pk.bits, 4, 2)
    assert (plan.slots, plan.slot_bits) == (9, 5)
    batch = encrypt_vector(KAT_VALUES, pk, plan, workers=1, exponents_for_testing=[123456789, 2**159 + 987654321])
    assert _cts(batch, pk.ciphertext_bytes) == [
        15725886839689626745601725196273057080,
        11541655452240524623915328286559949308,
    ]
    assert pack(plan.encode(KAT_VALUES), slots=9, slot_bits=5) == [12139060600256, 13448]
    assert decrypt_vector(batch, sk).tolist() == KAT_VALUES.tolist()


def test_known_answer_full_randomness_matches_phe_raw_encrypt() -> None:
    pk, sk = _kat_key()
    assert sk.to_phe().raw_decrypt(4987590876837969544568580788807704116) == 12139060600256
    plan = PackingPlan(pk.bits, 4, 2)
    batch = encrypt_vector(KAT_VALUES, pk, plan, randomness="full", workers=1, exponents_for_testing=[1234567, 7654321])
    expected = [4987590876837969544568580788807704116, 8330345978541714088389346123075481248]
    assert _cts(batch, pk.ciphertext_bytes) == expected
    ppk = phe_paillier.PaillierPublicKey(pk.n)
    assert [
        ppk.raw_encrypt(m, r_value=r) for m, r in zip([12139060600256, 13448], [1234567, 7654321], strict=True)
    ] == expected
    assert fast.raw_encrypt(pk.n, 13448, pow(7654321, pk.n, pk.nsquare)) == expected[1]


def test_fixed_base_table_matches_powmod() -> None:
    pk, _ = _kat_key()
    table = fast.FixedBaseTable(pk.fixed_base, pk.nsquare, exp_bits=160, window=7)
    for a in (0, 1, 2**159 + 12345, 2**160 - 1, 987654321987654321):
        assert int(table.power(a)) == pow(pk.fixed_base, a, pk.nsquare)
    with pytest.raises(ValueError):
        table.power(2**160)


# -- loud failures -----------------------------------------------------------------------------------


def test_batch_under_another_key_is_refused(
    keys: tuple[PaillierPublicKey, PaillierPrivateKey], other_keys: tuple[PaillierPublicKey, PaillierPrivateKey]
) -> None:
    pk, sk = keys
    pk2, sk2 = other_keys
    plan = PackingPlan.for_key(pk, value_bits=8, summands=2)
    mine = encrypt_vector(np.arange(5), pk, plan)
    theirs = encrypt_vector(np.arange(5), pk2, plan)
    with pytest.raises(KeyMismatchError, match="distribute the current public key"):
        add_batches([mine, theirs], pk)
    with pytest.raises(KeyMismatchError):
        decrypt_vector(mine, sk2)
    # forging the fingerprint does not help: the plaintext fails the range checks
    forged = dataclasses.replace(theirs, fingerprint=pk.fingerprint).sealed()
    with pytest.raises(CodecError):
        decrypt_vector(add_batches([mine, forged], pk), sk)


def test_truncated_and_tampered_batches_fail_loudly(keys: tuple[PaillierPublicKey, PaillierPrivateKey]) -> None:
    pk, sk = keys
    plan = PackingPlan.for_key(pk, value_bits=8, summands=2)
    batch = encrypt_vector(np.tile(np.arange(-127, 128), 2), pk, plan)  # 5 ciphertexts
    w = pk.ciphertext_bytes
    truncated = dataclasses.replace(batch, data=batch.data[:-w])
    with pytest.raises(CodecError, match="truncated"):
        add_batches([truncated], pk)
    with pytest.raises(CodecError, match="truncated"):
        decrypt_vector(truncated.sealed(), sk)  # even with a recomputed digest
    flipped = bytearray(batch.data)
    flipped[w + 17] ^= 0x40
    tampered = dataclasses.replace(batch, data=bytes(flipped))
    with pytest.raises(CodecError, match="digest"):
        decrypt_vector(tampered, sk)
    with pytest.raises(CodecError, match="tampered"):
        decrypt_vector(tampered.sealed(), sk)  # digest recomputed: the range checks still catch it
    too_big = dataclasses.replace(batch, data=b"\xff" * w + batch.data[w:]).sealed()
    with pytest.raises(CodecError, match=r"\[1, n\^2\)"):
        decrypt_vector(too_big, sk)
    with pytest.raises(CodecError, match="digest"):
        decrypt_vector(dataclasses.replace(batch, summands=2), sk)
    with pytest.raises(ProtocolError, match="same plan"):
        add_batches([batch, encrypt_vector(np.arange(510), pk, PackingPlan.for_key(pk, value_bits=11, summands=2))], pk)


def test_overflow_is_refused_before_encryption(
    keys: tuple[PaillierPublicKey, PaillierPrivateKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    pk, _ = keys
    plan = PackingPlan.for_key(pk, value_bits=8, summands=2)

    def no_encryption(*args: object, **kwargs: object) -> None:
        raise AssertionError("encryption must not start")

    monkeypatch.setattr(fast, "run_jobs", no_encryption)
    for bad in (np.array([0, 128]), np.array([-128]), np.array([0.5]), np.array([10**12])):
        with pytest.raises(OverflowRiskError):
            encrypt_vector(bad, pk, plan)
    monkeypatch.undo()
    ok = encrypt_vector(np.array([127, -127]), pk, plan)
    with pytest.raises(OverflowRiskError, match="at most 2"):
        add_batches([ok, ok, ok], pk)
    two = add_batches([ok, ok], pk)
    with pytest.raises(OverflowRiskError, match="at most 2"):
        add_batches([two, ok], pk)


def test_miscounted_sum_is_detected(keys: tuple[PaillierPublicKey, PaillierPrivateKey]) -> None:
    """An aggregate that understates its summand count breaks the slot headroom check, never decodes wrong."""
    pk, sk = keys
    plan = PackingPlan.for_key(pk, value_bits=8, summands=4)
    v = np.full(10, 127)
    agg = add_batches([encrypt_vector(v, pk, plan)] * 3, pk)
    with pytest.raises(CodecError, match="headroom"):
        decrypt_vector(dataclasses.replace(agg, summands=1).sealed(), sk)
