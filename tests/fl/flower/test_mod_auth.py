"""Authenticated SecAgg / SecAgg+ through ``privagg_mod`` + ``SecureAggregation`` (a user's own Flower app).

Each node holds only its own identity key and the consortium's roster (its own node config); its client
id is its own roster entry, which it proves to the server by a signed answer (``identify``) and which
the server cannot change. The adversaries here: a server that ships another roster, assigns a node
another identity, or asks a node that requires authentication for an unauthenticated round; a node
without identity keys. (The protocol-level attacks of an active server are in
``tests/adversary/test_active_server.py``; a node claiming another's identity in
``tests/adversary/test_malicious_supernode.py``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fl.runners.flower.identity import IDENTITY_KEY_FILE, IDENTITY_ROSTER_FILE, Roster
from fl.runners.flower.mod import RECORD, SecureTerms, flatten
from fl.runners.flower.policy import NodePolicy
from fl.runners.flower.workflow import SecureAggregation
from secagg import wire
from tests.adversary.flower_harness import mod_identities
from tests.fl.flower._loopback import LoopbackGrid
from tests.fl.flower.test_auth_flower import _swap_key
from tests.fl.flower.test_secure_aggregation import _app, _examples, _initial, _plain_mean, _run_mod, _start_message

NODES = [101, 102, 103]


def _grid(tmp: Path, **policy: Any) -> tuple[LoopbackGrid, Roster]:
    """Three nodes with their own identity keys (roster entries in reverse node order); with ``policy``, a
    node policy that also pins the roster's SHA-256."""
    grid = LoopbackGrid(_app(), 3, tmp)
    roster = mod_identities(grid, tmp)
    if policy:
        pol = NodePolicy(roster_sha256=roster.fingerprint(), **policy).save(tmp / "policy.json")
        for ctx in grid.contexts.values():
            ctx.node_config["policy-file"] = str(pol)
    return grid, roster


def _round(grid: LoopbackGrid, sa: SecureAggregation, rnd: int = 1) -> list[Any]:
    return list(sa.wrap(grid).send_and_receive(FedAvg().configure_train(rnd, _initial(), ConfigRecord(), grid)))


def _tolerance(sa: SecureAggregation, mean: np.ndarray, size: int) -> float:
    bound = sa.terms.with_cohort(3).pipeline(size)
    q = bound.pipeline.layers[0].quantizer(bound.specs[0])  # type: ignore[attr-defined]
    w = sum(min(_examples(n), 1000) / 1000 for n in NODES)
    return float(3 / q.scale / w + 3 / q.scale * np.abs(mean).max() / w)


def _sent_phases(grid: LoopbackGrid) -> list[str]:
    out = []
    for m in grid.sent:
        rec: Any = m.content.get(RECORD, None)
        if rec is not None:
            out.append(str(rec["stage"]))
            out += [type(p).__name__ for p in wire.decode_frames(list(rec.get("msgs", [])))]
    return out


@pytest.mark.parametrize("protocol", ["secagg+", "secagg"])
def test_an_authenticated_round_gives_the_same_aggregate_as_an_unauthenticated_one(tmp_path: Path,
                                                                                     protocol: str) -> None:
    """Two rounds of Flower's FedAvg: authenticated (signed messages, consistency round, roster entries in
    reverse node order) and unauthenticated both equal the plain weighted mean within the quantization bound."""
    grid, _ = _grid(tmp_path, require_authenticated=True)
    auth = SecureAggregation(protocol=protocol, threshold=0.7, poll_interval=0.0, authenticated=True,
                             roster=tmp_path / "identity" / "roster.json")
    plain_grid = LoopbackGrid(_app(), 3, tmp_path / "plain")
    plain = SecureAggregation(protocol=protocol, threshold=0.7, poll_interval=0.0)
    glob = flatten(_initial()).astype(np.float64)
    for rnd in (1, 2):
        assert len(_round(grid, auth, rnd)) == 1 and len(_round(plain_grid, plain, rnd)) == 1
        mean = _plain_mean(NODES, rnd, glob)
        tol = _tolerance(auth, mean, glob.size)
        np.testing.assert_allclose(auth.history[-1].mean_update, mean, atol=tol, rtol=0)
        np.testing.assert_allclose(plain.history[-1].mean_update, mean, atol=tol, rtol=0)
        np.testing.assert_allclose(auth.history[-1].mean_update, plain.history[-1].mean_update, atol=2 * tol, rtol=0)
        assert sorted(auth.history[-1].included) == NODES
        assert auth.history[-1].weight == pytest.approx(plain.history[-1].weight)
    assert auth._cids == {101: 2, 102: 1, 103: 0}  # each node's own roster entry, not its rank
    phases = _sent_phases(grid)
    assert phases.count("identify") == 3, "each node is asked its identity once per run, not per round"
    assert phases.count("ConsistencyCheck") == 6 and "ConsistencyCheck" not in _sent_phases(plain_grid)
    (g,) = [g for g in auth.ledger.as_list()[0]["guarantees"] if g["layer"] == protocol]
    assert g["against"].startswith("an active (malicious) server") and g["params"]["authenticated"] is True


def test_the_workflow_takes_the_roster_as_a_roster_a_dict_or_a_path_and_names_the_fix(tmp_path: Path) -> None:
    _, roster = _grid(tmp_path)
    for given in (roster, roster.to_dict(), str(tmp_path / "identity" / "roster.json")):
        assert SecureAggregation(authenticated=True, roster=given).roster == roster
    with pytest.raises(ValueError, match="privagg flower roster"):
        SecureAggregation(authenticated=True)
    with pytest.raises(ValueError, match="add authenticated=True"):
        SecureAggregation(roster=roster)


# ---------------------------------------------------------------- the node's own configuration decides
def test_a_node_requiring_authentication_refuses_an_unauthenticated_round(tmp_path: Path) -> None:
    grid, _ = _grid(tmp_path, require_authenticated=True)
    reply = _run_mod(grid, _start_message(SecureTerms(threshold=0.7, cohort=3)))
    assert reply.has_error() and "requires it" in reply.error.reason
    assert "SecureAggregation(authenticated=True, roster=...)" in reply.error.reason
    assert _round(grid, SecureAggregation(threshold=0.7, poll_interval=0.0)) == []  # no node started: no sum
    assert _round(grid, SecureAggregation(threshold=0.7, poll_interval=0.0, authenticated=True,
                                          roster=tmp_path / "identity" / "roster.json"), 2) != []


def test_a_round_whose_roster_differs_from_the_nodes_own_is_refused(tmp_path: Path) -> None:
    """The server substitutes client 0's public key in its roster: every node refuses to identify itself (so
    no round runs), and a start naming that roster is refused too."""
    grid, roster = _grid(tmp_path)
    swapped = _swap_key(roster, 0, tmp_path)
    sa = SecureAggregation(threshold=0.7, poll_interval=0.0, authenticated=True, roster=swapped)
    assert _round(grid, sa) == [] and sa._cids == {} and sa.history == []
    rec = {**SecureTerms(threshold=0.7, cohort=3, authenticated=True).to_record(), "roster": swapped.fingerprint()}
    reply = _run_mod(grid, _with(_start_message(SecureTerms(cohort=3), cid=2), rec))
    assert reply.has_error() and "the server substituted identity keys" in reply.error.reason


def _with(msg: Any, fields: dict[str, Any]) -> Any:
    rec = msg.content[RECORD]
    for k, v in fields.items():
        rec[k] = v
    return msg


def test_a_server_assigning_a_node_another_identity_is_refused(tmp_path: Path) -> None:
    """Node 101 is roster entry 2: a start that calls it client 0 is refused before it trains; as client 2 it
    runs. A workflow whose node map was swapped gets no sum."""
    grid, roster = _grid(tmp_path)
    rec = {**SecureTerms(threshold=0.7, cohort=3, authenticated=True).to_record(), "roster": roster.fingerprint()}
    wrong = _run_mod(grid, _with(_start_message(SecureTerms(cohort=3), rnd=1, cid=0), rec))
    assert wrong.has_error() and "assigned this node client id 0, but its identity key is the roster's entry 2" \
        in wrong.error.reason
    assert not _run_mod(grid, _with(_start_message(SecureTerms(cohort=3), rnd=1, cid=2), rec)).has_error()
    sa = SecureAggregation(threshold=0.7, poll_interval=0.0, authenticated=True, roster=roster)
    sa._cids = {101: 0, 102: 1, 103: 2}  # as if mapped by sorted node id
    assert _round(grid, sa, 2) == [] and sa.history == []


def test_a_node_without_identity_keys_names_privagg_flower_identity(tmp_path: Path) -> None:
    grid, roster = _grid(tmp_path)
    for ctx in grid.contexts.values():
        del ctx.node_config[IDENTITY_KEY_FILE], ctx.node_config[IDENTITY_ROSTER_FILE]
    rec = {**SecureTerms(threshold=0.7, cohort=3, authenticated=True).to_record(), "roster": roster.fingerprint()}
    reply = _run_mod(grid, _with(_start_message(SecureTerms(cohort=3)), rec))
    assert reply.has_error() and "identity-key-file" in reply.error.reason
    assert "privagg flower identity" in reply.error.reason


def test_a_node_whose_roster_is_not_the_one_its_policy_pins_refuses(tmp_path: Path) -> None:
    grid, roster = _grid(tmp_path)
    other = _swap_key(roster, 1, tmp_path).save(tmp_path / "other.json")
    pin = NodePolicy(roster_sha256=roster.fingerprint()).save(tmp_path / "pin.json")
    for ctx in grid.contexts.values():
        ctx.node_config[IDENTITY_ROSTER_FILE], ctx.node_config["policy-file"] = str(other), str(pin)
    sa = SecureAggregation(threshold=0.7, poll_interval=0.0, authenticated=True, roster=Roster.load(other))
    assert _round(grid, sa) == [] and sa._cids == {}
    reply = _run_mod(grid, _with(_start_message(SecureTerms(cohort=3), cid=2),
                                 {**SecureTerms(cohort=3, authenticated=True).to_record(),
                                  "roster": Roster.load(other).fingerprint()}))
    assert reply.has_error() and "not the one this node's policy pins" in reply.error.reason


def test_an_authenticated_round_survives_a_node_dropping_after_key_sharing(tmp_path: Path) -> None:
    """Node 103 goes silent after the share phase (SecAgg, t = 2 of 3): the two survivors sign the survivor
    list, unmask 103's pairwise masks, and the sum is exactly their weighted mean; the next round runs all 3."""
    grid, roster = _grid(tmp_path)
    steps: dict[int, int] = {}

    def silent_after_share(msg: Any) -> bool:
        rec = msg.content[RECORD]
        if rec["stage"] != "step":
            return False
        steps[103] = steps.get(103, 0) + 1
        return steps[103] > 1  # answers the key directory, then nothing (its masked input never comes)

    grid.silent[103] = silent_after_share
    sa = SecureAggregation(protocol="secagg", threshold=0.6, poll_interval=0.0, phase_timeout=0.2,
                           authenticated=True, roster=roster)
    assert len(_round(grid, sa)) == 1
    out = sa.history[0]
    assert sorted(out.included) == [101, 102] and sorted(out.planned) == NODES
    glob = flatten(_initial()).astype(np.float64)
    np.testing.assert_allclose(out.mean_update, _plain_mean([101, 102], 1, glob), atol=1e-6)
    assert "ConsistencyCheck" in _sent_phases(grid)
    del grid.silent[103]
    assert len(_round(grid, sa, 2)) == 1 and sorted(sa.history[1].included) == NODES


def test_authenticated_rounds_with_distributed_dp_are_accounted(tmp_path: Path) -> None:
    """clip + distributed noise + authenticated SecAgg+: the node's noise floor and the roster both hold, and
    the ledger states the noise and the active-server guarantee."""
    grid, roster = _grid(tmp_path, min_noise_multiplier=0.5, require_authenticated=True)
    sa = SecureAggregation(threshold=0.7, clip=1.0, noise_multiplier=1.0, placement="clients", poll_interval=0.0,
                           authenticated=True, roster=roster)
    assert len(_round(grid, sa)) == 1 and sorted(sa.history[0].included) == NODES
    layers = {g["layer"]: g for g in sa.ledger.as_list()[0]["guarantees"]}
    assert any("noise" in name for name in layers)
    assert layers["secagg+"]["params"]["authenticated"] is True
    assert sa.report()["privacy"]["epsilon"] > 0
