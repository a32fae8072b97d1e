"""Large updates over Flower: arrays above one wire frame (2^24 values) stream as frames, bounded by the receiver.

Before, every protocol message crossed Flower as one ``wire.dumps`` byte string, which refuses arrays of
more than 2^24 values: no client update above 16.7M values could be summed over Flower. A malicious node
must not make the ServerApp allocate more than the round's vector needs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Message

from fl.runners.flower import FlowerJob
from fl.runners.flower.job import decode_msgs, encode_msgs, stream_bound
from fl.runners.flower.link import Progress
from fl.runners.flower.serverapp import serve
from fl.spec import ValueSpec
from secagg import wire
from secagg.errors import CodecError
from secagg.masking.messages import MaskedInput
from tests.adversary.flower_harness import InProcessGrid, node_context, reply_with, server_identity


@pytest.fixture(autouse=True)
def _as_server(monkeypatch: pytest.MonkeyPatch) -> None:
    server_identity(monkeypatch)


def _masked(n: int) -> MaskedInput:
    return MaskedInput(sender=1, recipient=-1, session=b"s" * 16, round=1, y=np.arange(n, dtype=np.uint32))


def test_an_array_above_one_frame_crosses_as_a_stream_and_back() -> None:
    msg = _masked(wire.MAX_ITEMS + 5)
    rec = encode_msgs([msg, _masked(3)])
    assert len(rec["msgs"]) == 1 + 2 + 1  # stream head, two chunks, then the small message in one frame
    with pytest.raises(CodecError):
        wire.dumps(msg)  # the old per-message encoding could not carry it
    back = decode_msgs(rec, max_values=wire.MAX_ITEMS + 5)
    assert [m.y.size for m in back] == [wire.MAX_ITEMS + 5, 3]
    assert np.array_equal(back[0].y, msg.y)


def test_the_receiver_bounds_a_streamed_array_before_allocating() -> None:
    rec = {"msgs": wire.encode_frames([_masked(5000)], max_items=1000)}
    with pytest.raises(CodecError, match="outside"):
        decode_msgs(rec, max_values=4999)
    assert stream_bound(ValueSpec(size=64, cohort=3, domain="ring", modulus=1 << 32, value_bits=30)) < 5000


def _sum_job(tmp_path: Path, size: int) -> FlowerJob:
    return FlowerJob(task="sum", out=str(tmp_path / "out"), clients=3, size=size, rounds=1, protocol="secagg+",
                     threshold=0.6, join_timeout=5, start_timeout=600, phase_timeout=600, poll_interval=0.0)


def _serve(tmp_path: Path, job: FlowerJob, tamper: dict[int, Any] | None = None) -> dict[str, Any]:
    contexts = {100 + c: node_context(tmp_path, 100 + c, c, job.num_clients, job.to_json()) for c in range(3)}
    return serve(InProcessGrid(contexts, tamper), job, Progress(Path(job.out)))  # type: ignore[arg-type]


def _oversized(req: Message, reply: Message) -> Message:
    """A node that streams a masked input far larger than the round's vector."""
    if req.metadata.message_type != "query.privagg_step" or reply.has_error():
        return reply
    fields = dict(reply.content["privagg"])
    msgs = wire.decode_frames(fields.get("msgs", []))
    if not any(isinstance(m, MaskedInput) for m in msgs):
        return reply
    big = [dataclasses.replace(m, y=np.zeros(10_000, dtype=m.y.dtype)) if isinstance(m, MaskedInput) else m
           for m in msgs]
    return reply_with(req, {**fields, "msgs": wire.encode_frames(big, max_items=1000)})


def test_an_oversized_stream_drops_that_node_not_the_round(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fl.runners.flower"):
        result = _serve(tmp_path, _sum_job(tmp_path, 64), {102: _oversized})
    (rnd,) = result["rounds"]
    assert rnd["exact"] and rnd["included_ids"] == [0, 1]
    assert "dropping client 2" in caplog.text


@pytest.mark.slow
def test_a_secure_sum_above_two_to_the_24_values_over_the_flower_apps(tmp_path: Path) -> None:
    """The real ServerApp round and ClientApps (in process): 2^24 + 7 values per client, summed exactly."""
    result = _serve(tmp_path, _sum_job(tmp_path, wire.MAX_ITEMS + 7))
    (rnd,) = result["rounds"]
    assert rnd["exact"] and rnd["included_ids"] == [0, 1, 2]


def test_the_workflow_for_users_apps_streams_and_bounds_too() -> None:
    """SecureAggregation's transport (users' own Flower apps) reads streamed replies, within its bound."""
    from flwr.app import ConfigRecord, RecordDict

    from fl.runners.flower.mod import RECORD
    from fl.runners.flower.workflow import FlowerTransport

    frames = wire.encode_frames([_masked(5000)], max_items=1000)
    reply = Message(RecordDict({RECORD: ConfigRecord({"msgs": frames})}), reply_to=Message(
        RecordDict(), dst_node_id=100, message_type="train"))
    ok = FlowerTransport(None, {1: 100}, session=b"s" * 16, round=1, last_phase="x", max_values=5000)  # type: ignore[arg-type]
    (msg,) = ok.decode(1, reply)
    assert isinstance(msg, MaskedInput) and msg.y.size == 5000
    tight = FlowerTransport(None, {1: 100}, session=b"s" * 16, round=1, last_phase="x", max_values=4000)  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        tight.decode(1, reply)
