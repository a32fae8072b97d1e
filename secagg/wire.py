"""Versioned, length-checked codec between protocol messages and bytes (for network runners).

Layout: ``b"PAGW" | version (u8) | type tag (u8) | fields``; every field has a fixed kind:
``i64`` (signed big-endian), ``bytes`` (u32 length + data), ``ids`` (u32 count + i64 each),
``blobs`` (u32 count + bytes each), ``array`` (dtype code u8 + u64 count + little-endian words),
``packed`` (dtype code u8 + u64 count + bit width u8 + the values' low ``width`` bits, packed LSB-first,
the last byte zero-padded), ``batch`` (a Paillier ciphertext batch: fingerprint bytes, size, value_bits,
capacity and summands as i64, ciphertext bytes, digest bytes; at most ``MAX_ITEMS`` bytes of ciphertexts
per frame). Decoding checks every length against what is left and refuses trailing
bytes and non-canonical padding; any bad input raises :class:`~secagg.errors.CodecError` and nothing
else. Masked inputs travel packed to the ring width (e.g. 26 bits for 16-bit inputs of 1024 clients),
not rounded up to 32/64-bit words (version 2; version 1 sent whole words).

Large arrays (a client update of more than ``MAX_ITEMS`` = 2^24 values, e.g. language-model adapters)
never cross in one piece: :func:`dumps_stream` yields a *stream head* frame (the message with its array
field empty, the total count and the number of chunks) followed by *chunk* frames of at most
``MAX_ITEMS`` values each, and :class:`StreamDecoder` (sans-IO: feed frames, get messages) writes each
chunk into one pre-allocated array, so the receiver holds one copy of the array plus one frame, and the
sender one frame at a time. :func:`encode_frames` / :func:`decode_frames` do this for a list of messages
(what a transport sends per phase). Small messages stay single frames, byte-identical to :func:`dumps`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import fields
from typing import Any, Final

import numpy as np

from secagg.errors import CodecError
from secagg.machine import Message
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
from secagg.paillier.ciphertexts import CiphertextBatch
from secagg.paillier.messages import PaillierAggregate, PaillierDecrypted, PaillierInput
from secagg.plain import PlainInput

__all__ = [
    "MAGIC",
    "MAX_ITEMS",
    "MAX_STREAM_ITEMS",
    "VERSION",
    "StreamDecoder",
    "decode_frames",
    "dumps",
    "dumps_stream",
    "encode_frames",
    "loads",
    "pack_bits",
    "pack_record",
    "unpack_bits",
    "unpack_record",
]

MAGIC: Final = b"PAGW"
VERSION: Final = 2
"""2: masked inputs packed to the ring width; self-mask commitments in AdvertiseKeys/KeyDirectory; signatures on
ShareKeys, MaskedInput, UnmaskResponse."""
MAX_ITEMS: Final = 1 << 24
"""Upper bound on list lengths and array sizes in one frame (a guard against absurd allocations); larger
arrays travel as a stream of chunks (:func:`dumps_stream`)."""
MAX_STREAM_ITEMS: Final = 1 << 31
"""Default upper bound on a streamed array's total length a :class:`StreamDecoder` pre-allocates."""
_STREAM_HEAD: Final = 11
_STREAM_CHUNK: Final = 12
_PACK_SLICE: Final = 1 << 20
"""Values packed per call inside a chunk (a multiple of 8, so slices concatenate byte-exactly)."""

_TYPES: Final[dict[int, type]] = {
    1: AdvertiseKeys,
    2: KeyDirectory,
    3: ShareKeys,
    4: ShareDelivery,
    5: MaskedInput,
    6: ConsistencyCheck,
    7: ConsistencySignature,
    8: UnmaskRequest,
    9: UnmaskResponse,
    10: PlainInput,
    13: PaillierInput,  # 11 and 12 are the stream head and chunk frames
    14: PaillierAggregate,
    15: PaillierDecrypted,
}
_TAGS: Final = {cls: tag for tag, cls in _TYPES.items()}
_DTYPES: Final[dict[int, np.dtype[Any]]] = {
    1: np.dtype("<u4"),
    2: np.dtype("<u8"),
    3: np.dtype("<f8"),
    4: np.dtype("<i8"),
}
_DTYPE_CODES: Final = {dt: code for code, dt in _DTYPES.items()}

_KIND_OF_FIELD: Final = {
    "sender": "i64",
    "recipient": "i64",
    "session": "bytes",
    "round": "i64",
    "c_pk": "bytes",
    "s_pk": "bytes",
    "signature": "bytes",
    "b_commit": "bytes",
    "b_commits": "blobs",
    "cohort": "ids",
    "ids": "ids",
    "recipients": "ids",
    "senders": "ids",
    "survivors": "ids",
    "alive": "ids",
    "dropped": "ids",
    "signers": "ids",
    "c_pks": "blobs",
    "s_pks": "blobs",
    "signatures": "blobs",
    "ciphertexts": "blobs",
    "b_shares": "blobs",
    "s_shares": "blobs",
    "y": "packed",
    "value": "array",
    "batch": "batch",
    "included": "ids",
    "total": "array",
}
_SCHEMA: Final = {cls: tuple((f.name, _KIND_OF_FIELD[f.name]) for f in fields(cls)) for cls in _TYPES.values()}
_I64 = struct.Struct(">q")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")


def dumps(msg: Message) -> bytes:
    """Encode one protocol message; ``CodecError`` for an unknown type or a field of the wrong kind."""
    tag = _TAGS.get(type(msg))
    if tag is None:
        raise CodecError(f"no wire encoding for {type(msg).__name__}")
    big = _array_field(type(msg))
    if big is not None and np.asarray(getattr(msg, big)).size > MAX_ITEMS:
        raise CodecError(
            f"{type(msg).__name__}.{big} has {np.asarray(getattr(msg, big)).size} values, more than one frame "
            f"carries ({MAX_ITEMS}); send it with secagg.wire.dumps_stream (or encode_frames) and decode "
            "with StreamDecoder (or decode_frames)"
        )
    out = [MAGIC, bytes((VERSION, tag))]
    try:
        for name, kind in _SCHEMA[type(msg)]:
            _encode(out, kind, getattr(msg, name))
    except (TypeError, ValueError, OverflowError, struct.error) as exc:
        raise CodecError(f"cannot encode {type(msg).__name__}: {exc}") from exc
    return b"".join(out)


def _encode(out: list[bytes], kind: str, v: Any) -> None:
    if kind == "i64":
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"expected an int, got {type(v).__name__}")
        out.append(_I64.pack(int(v)))
    elif kind == "f64":
        if not isinstance(v, (int, float, np.floating)) or isinstance(v, bool):
            raise TypeError(f"expected a float, got {type(v).__name__}")
        out.append(_F64.pack(float(v)))
    elif kind == "bytes":
        if not isinstance(v, (bytes, bytearray)):
            raise TypeError(f"expected bytes, got {type(v).__name__}")
        out += [_U32.pack(len(v)), bytes(v)]
    elif kind == "ids":
        ids = [int(i) for i in v]
        out += [_U32.pack(len(ids)), b"".join(_I64.pack(i) for i in ids)]
    elif kind == "blobs":
        out.append(_U32.pack(len(v)))
        for b in v:
            _encode(out, "bytes", b)
    elif kind == "batch":
        _encode_batch(out, v)
    elif kind == "packed":
        arr = np.asarray(v)
        if arr.ndim != 1 or arr.dtype.kind != "u":
            raise TypeError(f"packed arrays are 1-D unsigned integers, got {arr.dtype} {arr.shape}")
        code = _DTYPE_CODES.get(arr.dtype.newbyteorder("<"))
        if code is None:
            raise TypeError(f"no wire encoding for arrays of {arr.dtype}")
        width = max(1, int(arr.max()).bit_length()) if arr.size else 1
        out += [bytes((code,)), _U64.pack(arr.size), bytes((width,))]
        out += [pack_bits(arr[i : i + _PACK_SLICE], width) for i in range(0, max(arr.size, 1), _PACK_SLICE)]
    else:
        arr = np.asarray(v)
        if arr.ndim != 1:
            raise ValueError(f"arrays on the wire are 1-D, got shape {arr.shape}")
        dt = arr.dtype.newbyteorder("<")
        code = _DTYPE_CODES.get(dt)
        if code is None:
            raise TypeError(f"no wire encoding for arrays of {arr.dtype}")
        out += [bytes((code,)), _U64.pack(arr.size), np.ascontiguousarray(arr, dtype=dt).tobytes()]


def _encode_batch(out: list[bytes], v: Any) -> None:
    """A Paillier :class:`CiphertextBatch`: fingerprint, size, value_bits, capacity, summands, data, digest."""
    if not isinstance(v, CiphertextBatch):
        raise TypeError(f"expected a CiphertextBatch, got {type(v).__name__}")
    _encode(out, "bytes", v.fingerprint)
    for x in (v.size, v.value_bits, v.capacity, v.summands):
        _encode(out, "i64", x)
    _encode(out, "bytes", v.data)
    _encode(out, "bytes", v.digest)


class _Reader:
    __slots__ = ("data", "max_items", "pos")

    def __init__(self, data: bytes, max_items: int = MAX_ITEMS) -> None:
        self.data = data
        self.pos = 0
        self.max_items = max_items  # one frame's array limit; larger only for a node's own sealed records

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError(
                f"truncated message: needs {n} more byte(s) at offset {self.pos}, has {len(self.data) - self.pos}"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def count(self, item_bytes: int) -> int:
        n = int(_U32.unpack(self.take(4))[0])
        if n > MAX_ITEMS or n * item_bytes > len(self.data) - self.pos:
            raise CodecError(f"declared length {n} exceeds the message")
        return n

    def read(self, kind: str) -> Any:
        if kind == "i64":
            return int(_I64.unpack(self.take(8))[0])
        if kind == "f64":
            return float(_F64.unpack(self.take(8))[0])
        if kind == "bytes":
            return self.take(self.count(1))
        if kind == "ids":
            n = self.count(8)
            return tuple(int(x) for x in np.frombuffer(self.take(8 * n), dtype=">i8"))
        if kind == "blobs":
            n = self.count(4)
            return tuple(self.read("bytes") for _ in range(n))
        if kind == "packed":
            return self.read_packed()
        if kind == "batch":  # checked against the key and plan by whoever uses it (CiphertextBatch.check)
            fp, size, vbits, cap, summands = self.read("bytes"), *(self.read("i64") for _ in range(4))
            return CiphertextBatch(fp, size, vbits, cap, summands, self.read("bytes"), self.read("bytes"))
        code = self.take(1)[0]
        dt = _DTYPES.get(code)
        if dt is None:
            raise CodecError(f"unknown array dtype code {code}")
        n = int(_U64.unpack(self.take(8))[0])
        if n > self.max_items:
            raise CodecError(f"declared array length {n} exceeds the {self.max_items}-value frame limit "
                             "(larger arrays travel as a stream: dumps_stream / StreamDecoder)")
        if n * dt.itemsize > len(self.data) - self.pos:
            raise CodecError(f"declared array length {n} exceeds the message")
        return np.frombuffer(self.take(n * dt.itemsize), dtype=dt).astype(dt.newbyteorder("="))


    def read_packed(self) -> Any:
        code = self.take(1)[0]
        dt = _DTYPES.get(code)
        if dt is None or dt.kind != "u":
            raise CodecError(f"unknown packed array dtype code {code}")
        n = int(_U64.unpack(self.take(8))[0])
        width = self.take(1)[0]
        if not 1 <= width <= 8 * dt.itemsize:
            raise CodecError(f"packed width {width} does not fit {dt}")
        nbytes = (n * width + 7) // 8
        if n > self.max_items:
            raise CodecError(f"declared array length {n} exceeds the {self.max_items}-value frame limit "
                             "(larger arrays travel as a stream: dumps_stream / StreamDecoder)")
        if nbytes > len(self.data) - self.pos:
            raise CodecError(f"declared array length {n} exceeds the message")
        raw = self.take(nbytes)
        spare = nbytes * 8 - n * width
        if spare and raw[-1] >> (8 - spare):
            raise CodecError("packed array has non-zero padding bits")
        return unpack_bits(raw, width, n).astype(dt.newbyteorder("="))


def pack_bits(values: Any, width: int) -> bytes:
    """The low ``width`` bits of each value, concatenated LSB-first (vectorised: one pass per column).

    ``64 / gcd(64, width)`` values fill a whole number of 64-bit words; values are laid out in rows of
    that many, and each column is shifted into its word(s) at once.
    """
    v = np.asarray(values).astype(np.uint64)
    m = v.size
    if width in (8, 16, 32, 64):
        return v.astype(f"<u{width // 8}").tobytes()
    group = 64 // math.gcd(64, width)
    words = group * width // 64
    rows = -(-m // group)
    flat = np.zeros(rows * group, dtype=np.uint64)
    flat[:m] = v & np.uint64((1 << width) - 1)
    cols = flat.reshape(rows, group)
    out = np.zeros((rows, words), dtype="<u8")
    for j in range(group):
        w, s = divmod(j * width, 64)
        out[:, w] |= cols[:, j] << np.uint64(s)
        if s + width > 64:
            out[:, w + 1] |= cols[:, j] >> np.uint64(64 - s)
    return out.tobytes()[: (m * width + 7) // 8]


def unpack_bits(raw: bytes, width: int, count: int) -> Any:
    """Inverse of :func:`pack_bits`: ``count`` uint64 values of ``width`` bits from ``raw``."""
    if width in (8, 16, 32, 64):
        return np.frombuffer(raw, dtype=f"<u{width // 8}", count=count).astype(np.uint64)
    group = 64 // math.gcd(64, width)
    words = group * width // 64
    rows = -(-count // group)
    buf = np.zeros(rows * words * 8, dtype=np.uint8)
    buf[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    packed = buf.view("<u8").reshape(rows, words)
    mask = np.uint64((1 << width) - 1)
    cols = np.empty((rows, group), dtype=np.uint64)
    for j in range(group):
        w, s = divmod(j * width, 64)
        col = packed[:, w] >> np.uint64(s)
        if s + width > 64:
            col |= packed[:, w + 1] << np.uint64(64 - s)
        cols[:, j] = col & mask
    return cols.reshape(-1)[:count]


def loads(data: bytes) -> Message:
    """Decode bytes from :func:`dumps`; raises only ``CodecError`` on bad input."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    r = _Reader(bytes(data))
    if r.take(4) != MAGIC:
        raise CodecError("not a privagg wire message (bad magic)")
    version, tag = r.take(2)
    if version != VERSION:
        raise CodecError(f"wire version {version} is not supported (this build speaks version {VERSION})")
    cls = _TYPES.get(tag)
    if cls is None:
        raise CodecError(f"unknown message type tag {tag}")
    values = {name: r.read(kind) for name, kind in _SCHEMA[cls]}
    if r.pos != len(r.data):
        raise CodecError(f"{len(r.data) - r.pos} trailing byte(s) after the message")
    msg: Message = cls(**values)
    return msg


def pack_record(magic: bytes, version: int, items: Sequence[tuple[str, Any]]) -> bytes:
    """Encode a flat record of ``(kind, value)`` fields with the message kinds (plus ``f64``).

    Used for data that is not a protocol message (a client's between-phase state) but must travel
    through the same versioned, length-checked conventions: ``magic | version (u8) | fields``.
    """
    if len(magic) != 4 or not 0 <= version < 256:
        raise CodecError("a record needs a 4-byte magic and a one-byte version")
    out = [magic, bytes((version,))]
    try:
        for kind, value in items:
            _encode(out, kind, value)
    except (TypeError, ValueError, OverflowError, struct.error) as exc:
        raise CodecError(f"cannot encode record field: {exc}") from exc
    return b"".join(out)


def unpack_record(data: bytes, magic: bytes, version: int, kinds: Sequence[str], *,
                  max_items: int = MAX_ITEMS) -> list[Any]:
    """Decode a :func:`pack_record` blob whose fields have ``kinds``; only ``CodecError`` on bad input.

    ``max_items``: the longest array a field may hold. The frame limit by default; a record the caller
    has already authenticated as its own (a sealed client state of a large model) may allow up to
    :data:`MAX_STREAM_ITEMS`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    if not 1 <= max_items <= MAX_STREAM_ITEMS:
        raise CodecError(f"max_items must be in [1, {MAX_STREAM_ITEMS}], got {max_items}")
    r = _Reader(bytes(data), max_items)
    if r.take(4) != magic:
        raise CodecError(f"not a {magic!r} record (bad magic)")
    got = r.take(1)[0]
    if got != version:
        raise CodecError(f"record version {got} is not supported (this build reads version {version})")
    values = [r.read(kind) for kind in kinds]
    if r.pos != len(r.data):
        raise CodecError(f"{len(r.data) - r.pos} trailing byte(s) after the record")
    return values


# ---- streams of frames for large arrays ------------------------------------------------------------
def _array_field(cls: type) -> str | None:
    """The one array field of a message type (``y`` or ``value``), if it has one."""
    names = [name for name, kind in _SCHEMA[cls] if kind in ("array", "packed")]
    return names[0] if names else None


def dumps_stream(msg: Message, *, max_items: int = MAX_ITEMS) -> Iterator[bytes]:
    """Encode ``msg`` as frames, none carrying more than ``max_items`` array values.

    A message whose array fits is one frame, equal to ``dumps(msg)``. Otherwise: a head frame
    ``MAGIC | VERSION | 11 | inner tag u8 | total u64 | chunks u32 | dtype code u8 | the message's fields
    with the array empty``, then ``chunks`` frames ``MAGIC | VERSION | 12 | index u32 | that slice`` (in
    the field's own kind). Frames are produced lazily: the sender holds one at a time.
    """
    if not 1 <= max_items <= MAX_ITEMS:
        raise CodecError(f"max_items must be in [1, {MAX_ITEMS}], got {max_items}")
    tag = _TAGS.get(type(msg))
    if tag is None:
        raise CodecError(f"no wire encoding for {type(msg).__name__}")
    big = _array_field(type(msg))
    arr = np.asarray(getattr(msg, big)) if big is not None else None
    if arr is None or arr.size <= max_items:
        yield dumps(msg)
        return
    if arr.ndim != 1:
        raise CodecError(f"arrays on the wire are 1-D, got shape {arr.shape}")
    code = _DTYPE_CODES.get(arr.dtype.newbyteorder("<"))
    if code is None:
        raise CodecError(f"no wire encoding for arrays of {arr.dtype}")
    chunks = -(-arr.size // max_items)
    head = dumps(_with_field(msg, big, arr[:0]))  # type: ignore[arg-type]
    yield b"".join([MAGIC, bytes((VERSION, _STREAM_HEAD, tag)), _U64.pack(arr.size), _U32.pack(chunks),
                    bytes((code,)), head[len(MAGIC) + 2 :]])
    kind = dict(_SCHEMA[type(msg)])[big]  # type: ignore[index]
    for i in range(chunks):
        out = [MAGIC, bytes((VERSION, _STREAM_CHUNK)), _U32.pack(i)]
        try:
            _encode(out, kind, arr[i * max_items : (i + 1) * max_items])
        except (TypeError, ValueError, OverflowError, struct.error) as exc:
            raise CodecError(f"cannot encode {type(msg).__name__}: {exc}") from exc
        yield b"".join(out)


def _with_field(msg: Message, name: str, value: Any) -> Message:
    values = {f.name: getattr(msg, f.name) for f in fields(msg)}  # type: ignore[arg-type]
    values[name] = value
    out: Message = type(msg)(**values)
    return out


class StreamDecoder:
    """Sans-IO receiver of :func:`dumps_stream` frames: ``feed(frame)`` returns the decoded message once
    it is whole (``None`` while a stream is open). Chunks must come in order; the array is allocated
    once, at its declared size, which must not exceed ``max_total`` (the receiver's own limit, e.g. the
    model size it expects). Any bad frame raises :class:`~secagg.errors.CodecError` and resets the stream.
    """

    def __init__(self, *, max_total: int = MAX_STREAM_ITEMS) -> None:
        self.max_total = max_total
        self._head: Message | None = None
        self._field = ""
        self._kind = ""
        self._buf: np.ndarray[Any, Any] | None = None
        self._filled = 0
        self._next = 0
        self._chunks = 0

    @property
    def open(self) -> bool:
        """True while a stream has started and not all of its chunks have arrived."""
        return self._head is not None

    def feed(self, frame: bytes) -> Message | None:
        """Take one frame; the message it completes, or ``None``."""
        try:
            return self._feed(frame)
        except CodecError:
            self._reset()
            raise

    def _feed(self, frame: bytes) -> Message | None:
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise CodecError(f"expected bytes, got {type(frame).__name__}")
        data = bytes(frame) if not isinstance(frame, bytes) else frame
        if len(data) < 6 or data[:4] != MAGIC or data[4] != VERSION:
            return loads(data)  # raises the precise error
        kind = data[5]
        if kind == _STREAM_HEAD:
            self._on_head(data)
            return None
        if kind == _STREAM_CHUNK:
            return self._on_chunk(data)
        if self._head is not None:
            raise CodecError(f"a message arrived while a stream had {self._chunks - self._next} chunk(s) to go")
        return loads(data)

    def _on_head(self, data: bytes) -> None:
        if self._head is not None:
            raise CodecError("a new stream started before the previous one was complete")
        r = _Reader(data)
        r.take(6)
        tag = r.take(1)[0]
        total, chunks = int(_U64.unpack(r.take(8))[0]), int(_U32.unpack(r.take(4))[0])
        dt = _DTYPES.get(r.take(1)[0])
        cls = _TYPES.get(tag)
        big = _array_field(cls) if cls is not None else None
        if cls is None or big is None or dt is None:
            raise CodecError("stream head names no message type with an array")
        if not 1 <= total <= self.max_total:
            raise CodecError(f"streamed array of {total} values is outside [1, {self.max_total}] "
                             "(raise StreamDecoder(max_total=...) if this size is expected)")
        if not -(-total // MAX_ITEMS) <= chunks <= total:
            raise CodecError(f"{chunks} chunks cannot carry {total} values within the frame limit")
        head = loads(MAGIC + bytes((VERSION, tag)) + data[r.pos :])
        if np.asarray(getattr(head, big)).size != 0:
            raise CodecError("a stream head carries its array in the chunks, not in the head")
        self._head, self._field, self._kind = head, big, dict(_SCHEMA[cls])[big]
        self._buf = np.empty(total, dtype=dt.newbyteorder("="))
        self._filled, self._next, self._chunks = 0, 0, chunks
        return None

    def _on_chunk(self, data: bytes) -> Message | None:
        if self._head is None or self._buf is None:
            raise CodecError("a stream chunk arrived without a stream head")
        r = _Reader(data)
        r.take(6)
        index = int(_U32.unpack(r.take(4))[0])
        if index != self._next:
            raise CodecError(f"stream chunk {index} arrived, expected chunk {self._next}")
        part = r.read(self._kind)
        if r.pos != len(r.data):
            raise CodecError(f"{len(r.data) - r.pos} trailing byte(s) after stream chunk {index}")
        if part.dtype != self._buf.dtype:
            raise CodecError(f"stream chunk {index} has {part.dtype} values, the stream declared {self._buf.dtype}")
        end = self._filled + part.size
        last = index == self._chunks - 1
        if part.size == 0 or end > self._buf.size or (last and end != self._buf.size):
            raise CodecError(f"stream chunk {index} does not fit the declared {self._buf.size} values")
        self._buf[self._filled : end] = part
        self._filled, self._next = end, index + 1
        if not last:
            return None
        msg = _with_field(self._head, self._field, self._buf)
        self._reset()
        return msg

    def _reset(self) -> None:
        self._head, self._buf = None, None
        self._filled = self._next = self._chunks = 0


def encode_frames(msgs: Iterable[Message], *, max_items: int = MAX_ITEMS) -> list[bytes]:
    """Every message's frames, in order (what a transport sends for one phase)."""
    return [frame for m in msgs for frame in dumps_stream(m, max_items=max_items)]


def decode_frames(frames: Iterable[bytes], *, max_total: int = MAX_STREAM_ITEMS) -> list[Message]:
    """The messages of :func:`encode_frames`'s frames; ``CodecError`` if a stream is left incomplete."""
    dec = StreamDecoder(max_total=max_total)
    out = [m for f in frames if (m := dec.feed(f)) is not None]
    if dec.open:
        raise CodecError("the frames end in the middle of a stream")
    return out
