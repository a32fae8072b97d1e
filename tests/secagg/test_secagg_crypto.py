"""Known-answer and property tests of the SecAgg primitives (Shamir, PRG, KDF, AEAD, signatures)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg._hazmat import aead, kex, prg, shamir, sign
from secagg.errors import KeyMismatchError

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def test_shamir_known_answer_vector() -> None:
    v = json.loads((VECTORS / "secagg_shamir.json").read_text())
    secret = bytes.fromhex(v["secret_hex"])
    t = v["threshold"]
    xs = [x for x, _ in v["shares"]]
    ys = shamir.split(secret, xs, threshold=t, coefficients=[int(c) for c in v["coefficients"]])
    assert ys == [int(y) for _, y in v["shares"]]
    # Independent check: evaluate the stored polynomial directly.
    poly = [int.from_bytes(secret, "big"), *(int(c) for c in v["coefficients"])]
    for x, y in v["shares"]:
        assert sum(c * x**i for i, c in enumerate(poly)) % shamir.PRIME == int(y)
    # Every t-subset reconstructs the secret; exactly t are required.
    shares = [(x, int(y)) for x, y in v["shares"]]
    for subset in itertools.combinations(shares, t):
        assert shamir.combine(list(subset), threshold=t) == secret
    with pytest.raises(ValueError):
        shamir.combine(shares[: t - 1], threshold=t)


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(2, 12), st.data())
def test_shamir_roundtrip_and_t_minus_one_is_uninformative(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(2, n))
    xs = data.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))
    ys = shamir.split(secret, xs, threshold=t, random_bytes=os.urandom)
    pts = list(zip(xs, ys, strict=True))
    chosen = data.draw(st.permutations(pts))[:t]
    assert shamir.combine(chosen, threshold=t) == secret
    # t-1 shares plus any forged t-th share interpolate some other value (no information leaks by design;
    # here we check that a wrong share is not silently accepted as the same secret).
    forged = [*chosen[:-1], (chosen[-1][0], (chosen[-1][1] + 1) % shamir.PRIME)]
    with contextlib.suppress(ValueError):
        assert shamir.combine(forged, threshold=t) != secret


def test_prg_known_answer_vector_and_nist_ctr() -> None:
    v = json.loads((VECTORS / "secagg_prg.json").read_text())
    nist = v["nist_f55"]
    enc = Cipher(algorithms.AES(bytes.fromhex(nist["key"])), modes.CTR(bytes.fromhex(nist["init_counter"]))).encryptor()
    assert enc.update(bytes.fromhex(nist["plaintext"])).hex() == nist["ciphertext"]
    seed = bytes.fromhex(v["seed_hex"])
    # Independent computation of the keystream: AES-256-ECB over counter blocks 0, 1, 2, ...
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    blocks = b"".join(i.to_bytes(16, "big") for i in range(8))
    assert ecb.update(blocks) + ecb.finalize() == bytes.fromhex(v["keystream_hex"])
    assert prg.keystream(seed, 128).hex() == v["keystream_hex"]
    assert prg.expand(seed, 32, np.uint32).tolist() == v["uint32"]
    assert [str(x) for x in prg.expand(seed, 16, np.uint64).tolist()] == v["uint64"]
    exp = prg.MaskExpander(32, np.uint32)
    acc = np.zeros(32, np.uint32)
    exp.add(acc, seed, +1)
    assert acc.tolist() == v["uint32"]
    exp.add(acc, seed, -1)
    assert not acc.any()


def test_prg_uses_the_whole_seed_not_a_32_bit_fold() -> None:
    """Peer flaw: MT19937 seeded with a 32-bit fold of the key (28 effective bits). Ours keys AES with 256 bits."""
    a = bytes(32)
    # Seeds that agree on every 32-bit XOR/sum fold but differ: a fold-based PRG would give equal masks.
    b = (1).to_bytes(4, "big") * 2 + bytes(24)
    assert int.from_bytes(b[:4], "big") ^ int.from_bytes(b[4:8], "big") == 0
    ma, mb = prg.expand(a, 64, np.uint32), prg.expand(b, 64, np.uint32)
    assert not np.array_equal(ma, mb)
    # Flipping any single bit of the seed changes about half of the mask bits.
    for bit in (0, 100, 255):
        flipped = bytearray(a)
        flipped[bit // 8] ^= 1 << (bit % 8)
        diff = np.unpackbits((prg.expand(bytes(flipped), 64, np.uint32) ^ ma).view(np.uint8))
        assert 0.4 < diff.mean() < 0.6


def test_no_insecure_randomness_in_secagg_sources() -> None:
    root = Path(__file__).resolve().parents[2] / "secagg"
    pattern = re.compile(r"^\s*(import random|from random import)|np\.random\.|numpy\.random", re.M)
    offenders = [p.name for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_hkdf_requires_label_and_separates_domains() -> None:
    sk = kex.generate_private(os.urandom)
    peer = kex.public_bytes(kex.generate_private(os.urandom))
    with pytest.raises(ValueError):
        kex.agree(sk, peer, label=b"")
    k1 = kex.agree(sk, peer, label=b"a", context=b"x")
    assert k1 != kex.agree(sk, peer, label=b"b", context=b"x")
    assert k1 != kex.agree(sk, peer, label=b"a", context=b"y")
    assert len(k1) == 32


def test_aead_binds_session_round_sender_recipient() -> None:
    key = os.urandom(32)
    ct = aead.encrypt(key, b"share", session=b"s", round=1, sender=2, recipient=3, random_bytes=os.urandom)
    assert aead.decrypt(key, ct, session=b"s", round=1, sender=2, recipient=3) == b"share"
    for change in ({"session": b"t"}, {"round": 2}, {"sender": 4}, {"recipient": 5}):
        args = {"session": b"s", "round": 1, "sender": 2, "recipient": 3, **change}
        with pytest.raises(KeyMismatchError):
            aead.decrypt(key, ct, **args)  # type: ignore[arg-type]


def test_signatures_need_the_right_key_and_label() -> None:
    key = sign.generate_identity(os.urandom)
    pub = sign.public_identity(key)
    sig = sign.sign(key, label=b"l", payload=b"p")
    assert sign.verify(pub, sig, label=b"l", payload=b"p")
    assert not sign.verify(pub, sig, label=b"m", payload=b"p")
    assert not sign.verify(pub, sig, label=b"l", payload=b"q")
    assert not sign.verify(sign.public_identity(sign.generate_identity(os.urandom)), sig, label=b"l", payload=b"p")
