"""The wire codec: every message round-trips; random, truncated or bit-flipped bytes raise only CodecError."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secagg import wire
from secagg.errors import CodecError
from secagg.masking.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySignature,
    KeyDirectory,
    MaskedInput,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from secagg.paillier import CiphertextBatch, PaillierAggregate, PaillierDecrypted, PaillierInput
from secagg.plain import PlainInput

ids = st.lists(st.integers(-2, 2**40), max_size=6).map(lambda x: tuple(sorted(set(x))))
blob = st.binary(max_size=80)
blobs = st.lists(blob, max_size=5).map(tuple)
head = {
    "sender": st.integers(-2, 2**40),
    "recipient": st.integers(-2, 2**40),
    "session": blob,
    "round": st.integers(-(2**63), 2**63 - 1),
}


def arrays(dtypes: tuple[type, ...]) -> st.SearchStrategy[np.ndarray]:
    return st.sampled_from(dtypes).flatmap(
        lambda dt: st.lists(st.integers(0, 2**32 - 1), max_size=20).map(lambda v: np.array(v, dtype=dt))
    )


messages = st.one_of(
    st.builds(AdvertiseKeys, **head, c_pk=blob, s_pk=blob, b_commit=blob, signature=blob),
    st.builds(
        KeyDirectory, **head, cohort=ids, ids=ids, c_pks=blobs, s_pks=blobs, signatures=blobs, b_commits=blobs
    ),
    st.builds(ShareKeys, **head, recipients=ids, ciphertexts=blobs, signature=blob),
    st.builds(ShareDelivery, **head, senders=ids, ciphertexts=blobs),
    st.builds(MaskedInput, **head, y=arrays((np.uint32, np.uint64)), signature=blob),
    st.builds(ConsistencyCheck, **head, survivors=ids),
    st.builds(ConsistencySignature, **head, signature=blob),
    st.builds(UnmaskRequest, **head, alive=ids, dropped=ids, signers=ids, signatures=blobs),
    st.builds(UnmaskResponse, **head, alive=ids, b_shares=blobs, dropped=ids, s_shares=blobs, signature=blob),
    st.builds(PlainInput, **head, value=arrays((np.uint64, np.float64))),
    st.builds(PaillierInput, **head, batch=st.builds(CiphertextBatch, blob, *[st.integers(-(2**63), 2**63 - 1)] * 4,
                                                     blob, blob)),
    st.builds(PaillierAggregate, **head, included=ids,
              batch=st.builds(CiphertextBatch, blob, *[st.integers(0, 2**20)] * 4, blob, blob)),
    st.builds(PaillierDecrypted, **head, included=ids, total=arrays((np.int64,))),
)


def _equal(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    for name in a.__dataclass_fields__:  # type: ignore[attr-defined]
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            if not (isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y)):
                return False
        elif x != y:
            return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_roundtrip_every_message_type(msg: object) -> None:
    data = wire.dumps(msg)  # type: ignore[arg-type]
    assert data[:4] == wire.MAGIC and data[4] == wire.VERSION
    assert _equal(wire.loads(data), msg)


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_truncated_or_bit_flipped_bytes_raise_only_codec_error(msg: object, data: st.DataObject) -> None:
    raw = wire.dumps(msg)  # type: ignore[arg-type]
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(CodecError):
        wire.loads(raw[:cut])
    with pytest.raises(CodecError):
        wire.loads(raw + b"\x00")
    flipped = bytearray(raw)
    bit = data.draw(st.integers(0, 8 * len(raw) - 1))
    flipped[bit // 8] ^= 1 << (bit % 8)
    with contextlib.suppress(CodecError):
        wire.loads(bytes(flipped))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([b"", wire.MAGIC + bytes([wire.VERSION])]), st.integers(0, 15))
def test_random_bytes_raise_only_codec_error(data: bytes, prefix: bytes, tag: int) -> None:
    raw = prefix + (bytes([tag]) if prefix else b"") + data
    try:
        msg = wire.loads(raw)
    except CodecError:
        return
    assert wire.loads(wire.dumps(msg)) is not None


def test_codec_refuses_other_versions_and_unknown_objects() -> None:
    raw = bytearray(wire.dumps(ConsistencySignature(1, -1, b"s", 0, b"sig")))
    for other in (1, wire.VERSION + 1):  # version 1: whole-word uploads, no commitments or signatures
        raw[4] = other
        with pytest.raises(CodecError, match="version"):
            wire.loads(bytes(raw))
    with pytest.raises(CodecError):
        wire.dumps(object())  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        wire.dumps(MaskedInput(1, -1, b"s", 0, np.zeros((2, 2), np.uint32)))
    with pytest.raises(CodecError):
        wire.loads("not bytes")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 64), data=st.data())
def test_bit_packing_round_trips_at_every_width(width: int, data: st.DataObject) -> None:
    vals = data.draw(st.lists(st.integers(0, (1 << width) - 1), max_size=300))
    arr = np.array(vals, dtype=np.uint64)
    raw = wire.pack_bits(arr, width)
    assert len(raw) == (len(vals) * width + 7) // 8
    assert wire.unpack_bits(raw, width, len(vals)).tolist() == vals


def test_masked_inputs_travel_packed_to_the_ring_width() -> None:
    """16-bit inputs of 1024 clients live in a 26-bit ring: 26 bits per value on the wire, not 32."""
    rng = np.random.default_rng(0)
    d = 1 << 16
    y = rng.integers(0, 1 << 26, size=d, dtype=np.uint64).astype(np.uint32)
    raw = wire.dumps(MaskedInput(3, -1, b"s" * 16, 0, y))
    assert len(raw) <= d * 26 // 8 + 64  # header + ids, no 32-bit words
    back = wire.loads(raw)
    assert isinstance(back, MaskedInput) and back.y.dtype == np.uint32 and np.array_equal(back.y, y)


def test_packed_arrays_refuse_bad_widths_and_padding() -> None:
    y = np.array([5, 3, 7], dtype=np.uint32)  # width 3: 9 bits -> 2 bytes, 7 padding bits
    raw = bytearray(wire.dumps(MaskedInput(3, -1, b"s", 0, y)))
    assert np.array_equal(wire.loads(bytes(raw)).y, y)  # type: ignore[attr-defined]
    end = len(raw) - len(wire.dumps(MaskedInput(3, -1, b"s", 0, y, b"")).split(wire.pack_bits(y, 3))[1])
    bad = bytearray(raw)  # the packed bytes end at ``end``; the (empty) signature field follows
    bad[end - 1] |= 0x80  # a padding bit set: a second encoding of the same value is refused
    with pytest.raises(CodecError, match="padding"):
        wire.loads(bytes(bad))
    bad = bytearray(raw)
    bad[end - 3] = 33  # width 33 does not fit uint32
    with pytest.raises(CodecError, match="width"):
        wire.loads(bytes(bad))


# ---- streams of frames for large arrays ----------------------------------------------------------
def _masked(n: int, bits: int = 26, seed: int = 0) -> MaskedInput:
    y = np.random.default_rng(seed).integers(0, 1 << bits, n, dtype=np.uint64).astype(np.uint32)
    return MaskedInput(3, -1, b"s" * 16, 7, y, b"sig" * 20)


@given(n=st.integers(1, 5000), max_items=st.integers(1, 1200), bits=st.integers(1, 32))
@settings(max_examples=40, deadline=None)
def test_stream_round_trips_in_chunks_of_at_most_max_items(n: int, max_items: int, bits: int) -> None:
    msg = _masked(n, bits)
    frames = list(wire.dumps_stream(msg, max_items=max_items))
    assert len(frames) == (1 if n <= max_items else 1 + -(-n // max_items))
    if n <= max_items:
        assert frames == [wire.dumps(msg)]  # small messages: the single-frame format, unchanged
    # no frame holds more than max_items values' worth of bytes (plus a small header)
    assert all(len(f) <= 64 + 4 * max_items + len(msg.signature) + len(msg.session) for f in frames)
    (got,) = wire.decode_frames(frames)
    assert isinstance(got, MaskedInput)
    assert np.array_equal(got.y, msg.y) and got.y.dtype == msg.y.dtype
    assert (got.sender, got.session, got.round, got.signature) == (msg.sender, msg.session, msg.round, msg.signature)


def test_plain_float_input_streams() -> None:
    msg = PlainInput(1, -1, b"x", 2, np.linspace(-1, 1, 2500))
    (got,) = wire.decode_frames(wire.encode_frames([msg, msg], max_items=1000)[:4])
    assert isinstance(got, PlainInput) and np.array_equal(got.value, msg.value)
    assert len(wire.decode_frames(wire.encode_frames([msg, msg], max_items=1000))) == 2


def test_dumps_refuses_more_than_a_frame_and_names_the_stream() -> None:
    """Regression: an array above 2^24 values used to encode, then fail to decode with a misleading
    'exceeds the message'; now the sender is told to stream it (and the decoder says why it refuses)."""
    big = np.zeros(wire.MAX_ITEMS + 1, dtype=np.uint32)
    with pytest.raises(CodecError, match="dumps_stream"):
        wire.dumps(MaskedInput(0, -1, b"s", 0, big))
    forged = wire.MAGIC + bytes((wire.VERSION, 10)) + wire.dumps(PlainInput(0, -1, b"", 0, np.zeros(1)))[6:-17]
    forged += bytes((3,)) + (wire.MAX_ITEMS + 1).to_bytes(8, "big")
    with pytest.raises(CodecError, match="frame limit"):
        wire.loads(forged)


def test_stream_decoder_refuses_bad_streams() -> None:
    frames = list(wire.dumps_stream(_masked(3000), max_items=1000))
    head, c0, c1, c2 = frames
    short = list(wire.dumps_stream(_masked(3000), max_items=500))[1]  # chunk 0 of 500 values
    for bad, why in [
        ([c0], "without a stream head"),
        ([head, c1], "expected chunk 0"),
        ([head, c0, head], "before the previous one"),
        ([head, c0, wire.dumps(_masked(5))], "while a stream"),
        ([head, c0, c1], "middle of a stream"),
        ([head, c0, c1, c2 + b"\0"], "trailing"),
        ([head, c0, c1, short[:6] + (2).to_bytes(4, "big") + short[10:]], "does not fit"),
    ]:
        with pytest.raises(CodecError, match=why):
            wire.decode_frames(bad)
    with pytest.raises(CodecError, match="max_total"):
        wire.decode_frames(frames, max_total=2999)  # the receiver's own size limit
    dec = wire.StreamDecoder()
    with pytest.raises(CodecError):
        dec.feed(c0)
    assert not dec.open and [dec.feed(f) for f in frames][-1] is not None  # a failed stream resets cleanly


@given(cut=st.integers(0, 10_000), flip=st.integers(0, 80_000))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_stream_garbage_raises_only_codec_error(cut: int, flip: int) -> None:
    frames = list(wire.dumps_stream(_masked(2100, 20), max_items=1000))
    k = cut % len(frames)
    f = bytearray(frames[k])
    f[flip % len(f)] ^= 1 << (flip % 8)
    mutated = [*frames[:k], bytes(f[:len(f) - cut % 3]), *frames[k + 1:]]
    with contextlib.suppress(CodecError):
        out = wire.decode_frames(mutated)
        assert len(out) == 1  # a flip inside the data may still decode, but only to one whole message


# ---- large updates: masks expanded in blocks, a round above one frame ----------------------------
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_block_mask_expansion_equals_one_shot_keystream(dtype: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """MaskExpander expands in blocks (O(block) memory); the mask is exactly the one-shot AES-CTR stream,
    across block edges and for a ragged last block."""
    from secagg._hazmat import prg

    monkeypatch.setattr(prg.MaskExpander, "BLOCK_WORDS", 1000)
    seed = bytes(range(32))
    n = 3 * 1000 + 17
    acc: np.ndarray = np.arange(n, dtype=dtype)
    exp = prg.MaskExpander(n, dtype)
    exp.add(acc, seed, +1)
    want = np.arange(n, dtype=dtype) + prg.expand(seed, n, dtype)
    assert np.array_equal(acc, want)
    exp.add(acc, seed, -1)
    assert np.array_equal(acc, np.arange(n, dtype=dtype))
    assert len(exp._buf) <= 1000 * np.dtype(dtype).itemsize + 16


@pytest.mark.slow
def test_secagg_plus_round_above_one_frame_is_exact_over_the_wire() -> None:
    """A SecAgg+ round of 3 clients with 2^24 + 1000 values each (more than one frame carries), every
    message through dumps_stream/StreamDecoder in client processes: the sum is exact and each client's
    peak RSS stays under 3 x d x 4 bytes above its interpreter."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "large_update.py"
    spec = importlib.util.spec_from_file_location("large_update", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    d = wire.MAX_ITEMS + 1000
    row = bench.run_wire(d, 3)
    assert row["exact"] and row["included"] == [0, 1, 2]
    for peak, base in zip(row["client_peak_rss"], row["client_base_rss"], strict=True):
        assert peak - base <= 3 * d * 4


def test_a_paillier_round_travels_over_the_wire_exactly() -> None:
    """A real Paillier input, aggregate and decrypted sum round-trip, and the decoded batch still checks."""
    from secagg.machine import KEY_HOLDER, SERVER
    from secagg.paillier import PackingPlan, PaillierClient, PaillierKeyHolder, add_batches, generate_keypair

    public, private = generate_keypair(bits=1024)
    plan = PackingPlan(1024, 16, 2)
    values = [np.arange(50, dtype=np.int64) - 25, np.full(50, 7, dtype=np.int64)]
    clients = [PaillierClient(c, v, b"s", 1, public, plan) for c, v in enumerate(values)]
    inputs = [wire.loads(wire.dumps(c.start()[0])) for c in clients]
    for m in inputs:
        m.batch.check(public, plan)  # digest and key survive the codec
    agg = PaillierAggregate(SERVER, KEY_HOLDER, b"s", 1, (0, 1), add_batches([m.batch for m in inputs], public))
    (out,) = PaillierKeyHolder(KEY_HOLDER, private, b"s", 1).receive(wire.loads(wire.dumps(agg)))
    decoded = wire.loads(wire.dumps(out))
    assert isinstance(decoded, PaillierDecrypted)
    np.testing.assert_array_equal(decoded.total, values[0] + values[1])
