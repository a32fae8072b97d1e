"""Adversary: one malicious SuperNode, against the real ServerApp round (``serve`` / ``_run_round``).

It answers the ServerApp's messages with anything it likes. The claim: a reply that does not have the
shape of ours (unknown keys, malformed JSON, wrong types, no record, messages for parties outside the
round) drops THAT client for the round, logged; the round still completes with the others (>= t), and
the sum is exactly the sum of the included clients' inputs. It never ends the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, RecordDict

from fl.config import PrivacyConfig, TrainConfig
from fl.runners.flower import FlowerJob
from fl.runners.flower.link import Progress
from fl.runners.flower.serverapp import serve
from secagg import wire
from tests.adversary.flower_harness import InProcessGrid, node_context, reply_with, server_identity

BAD = 2  # the malicious node's client id


@pytest.fixture(autouse=True)
def _as_server(monkeypatch: pytest.MonkeyPatch) -> None:
    server_identity(monkeypatch)


def _fields(reply: Message) -> dict[str, Any]:
    return dict(reply.content["privagg"])


def _on(kind: str, forge: Callable[[Message, Message], Message]) -> Callable[[Message, Message], Message]:
    """Tamper only with replies to ``kind`` messages (e.g. the first protocol step)."""
    def tamper(req: Message, reply: Message) -> Message:
        return forge(req, reply) if req.metadata.message_type == kind and not reply.has_error() else reply

    return tamper


def _readdressed(req: Message, reply: Message) -> Message:
    msgs = [wire.dumps(dataclasses.replace(wire.loads(b), recipient=99)) for b in _fields(reply)["msgs"]]
    return reply_with(req, {**_fields(reply), "msgs": msgs})


STEP_FORGERIES: dict[str, Callable[[Message, Message], Message]] = {
    "garbage bytes": lambda req, r: reply_with(req, {**_fields(r), "msgs": [b"\x00not wire"]}),
    "msgs is a string": lambda req, r: reply_with(req, {**_fields(r), "msgs": "abc"}),
    "no privagg record": lambda req, r: Message(RecordDict({"other": ConfigRecord({"x": 1})}), reply_to=req),
    "message for a party outside the round": _readdressed,
}


def _run(tmp_path: Path, job: FlowerJob, tamper: Any) -> dict[str, Any]:
    contexts = {100 + c: node_context(tmp_path, 100 + c, c, job.num_clients, job.to_json()) for c in range(3)}
    grid = InProcessGrid(contexts, {100 + BAD: tamper})
    return serve(grid, job, Progress(Path(job.out)))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(STEP_FORGERIES))
def test_a_bad_protocol_reply_drops_that_client_not_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    job = FlowerJob(task="sum", out=str(tmp_path / "out"), clients=3, size=64, rounds=2, protocol="secagg+",
                    threshold=0.6, join_timeout=5, start_timeout=5, phase_timeout=5, poll_interval=0.0)
    with caplog.at_level(logging.WARNING, logger="fl.runners.flower"):
        result = _run(tmp_path, job, _on("query.privagg_step", STEP_FORGERIES[name]))
    assert [r["exact"] for r in result["rounds"]] == [True, True]  # the server checked each sum exactly
    assert [r["included_ids"] for r in result["rounds"]] == [[0, 1], [0, 1]]
    assert f"dropping client {BAD}" in caplog.text


def test_malformed_timing_metadata_is_ignored_not_fatal(tmp_path: Path) -> None:
    """``compute_s`` is only shown in the latency breakdown: text there neither ends the run nor counts."""
    job = FlowerJob(task="sum", out=str(tmp_path / "out"), clients=3, size=64, rounds=1, protocol="secagg+",
                    threshold=0.6, join_timeout=5, start_timeout=5, phase_timeout=5, poll_interval=0.0)
    forge = _on("query.privagg_step", lambda req, r: reply_with(req, {**_fields(r), "compute_s": "fast"}))
    result = _run(tmp_path, job, forge)
    assert result["rounds"][0]["exact"] is True and result["rounds"][0]["included_ids"] == [0, 1, 2]


TRAIN_FORGERIES: dict[str, Callable[[Message, Message], Message]] = {
    "unexpected key in the result": lambda req, r: reply_with(
        req, {**_fields(r), "result": json.dumps({**json.loads(_fields(r)["result"]), "evil": 1})}),
    "malformed JSON result": lambda req, r: reply_with(req, {**_fields(r), "result": "{not json"}),
    "result of the wrong type": lambda req, r: reply_with(
        req, {**_fields(r), "result": json.dumps({**json.loads(_fields(r)["result"]), "num_samples": "many"})}),
    "no result at all": lambda req, r: reply_with(req, {k: v for k, v in _fields(r).items() if k != "result"}),
}


@pytest.mark.parametrize("name", sorted(TRAIN_FORGERIES))
def test_a_bad_training_reply_drops_that_client_not_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    config = TrainConfig(dataset="breast_cancer", clients=3, rounds=1, seed=5, model="logreg",
                         privacy=PrivacyConfig(spec="clip,secagg+", clip=1.0, threshold=0.6))
    job = FlowerJob(task="train", out=str(tmp_path / "out"), config=config.as_dict(), join_timeout=5,
                    start_timeout=30, phase_timeout=5, poll_interval=0.0)
    with caplog.at_level(logging.WARNING, logger="fl.runners.flower"):
        result = _run(tmp_path, job, _on("train.privagg_start", TRAIN_FORGERIES[name]))
    (round1,) = result["rounds"]  # the run finished and recorded the round
    assert f"dropping client {BAD}" in caplog.text
    # Without client 2 the round runs over the other two, or -- where the clients pin the planned cohort
    # (min_cohort = 3, so a shrunken directory cannot lower t) -- is aborted cleanly; never with client 2.
    assert round1.get("included_ids", []) in ([0, 1], [])
    assert ("aborted" in round1) == (round1.get("included_ids") is None)


# ---------------------------------------------------------------- privagg_mod: a node claiming another's identity
@pytest.mark.parametrize("signature", ["its own", "copied"])
def test_a_node_claiming_another_nodes_roster_entry_sits_out_and_the_honest_one_keeps_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, signature: str
) -> None:
    """Authenticated SecureAggregation: node 101 answers the identify request as node 102's roster entry,
    signed with its own key (or with node 102's genuine signature, which binds node 102's Flower node id).
    The server refuses the claim, node 102 keeps its entry, and the round is exactly the two honest
    nodes' weighted mean."""
    import numpy as np
    from flwr.serverapp.strategy import FedAvg

    from fl.runners.flower.mod import RECORD, flatten
    from fl.runners.flower.workflow import SecureAggregation
    from tests.adversary.flower_harness import mod_identities
    from tests.fl.flower._loopback import LoopbackGrid
    from tests.fl.flower.test_secure_aggregation import _app, _initial, _plain_mean

    grid = LoopbackGrid(_app(), 3, tmp_path)
    mod_identities(grid, tmp_path)  # node 101 is entry 2, 102 is entry 1, 103 is entry 0
    forged: dict[str, Any] = {}

    def claim_entry_1(nid: int, reply: Message) -> Message:
        rec: Any = None if reply.has_error() else reply.content.get(RECORD, None)
        if rec is None or "signature" not in rec:
            return reply
        if nid == 101:
            rec["cid"] = 1
            forged["rec"] = rec
        if nid == 102 and signature == "copied" and "rec" in forged:
            forged["rec"]["signature"] = rec["signature"]  # 102's genuine signature, as if 101 had seen it
        return reply

    grid.tamper = claim_entry_1
    sa = SecureAggregation(threshold=0.7, poll_interval=0.0, phase_timeout=0.5, authenticated=True,
                           roster=tmp_path / "identity" / "roster.json")
    with caplog.at_level(logging.WARNING, logger="fl.runners.flower"):
        sa.wrap(grid).send_and_receive(FedAvg().configure_train(1, _initial(), ConfigRecord(), grid))
    assert "node 101 is not in this round" in caplog.text and "not signed by that client's key" in caplog.text
    assert sa._cids == {102: 1, 103: 0}
    (out,) = sa.history
    assert sorted(out.included) == [102, 103]
    glob = flatten(_initial()).astype(np.float64)
    np.testing.assert_allclose(out.mean_update, _plain_mean([102, 103], 1, glob), atol=1e-6)
