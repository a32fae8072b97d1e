"""assert_input_private: green on SecAgg and SecAgg+, and each planted bug fails exactly its check."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings

from fl.layers.clip import Clip, Quantize
from fl.pipeline import Pipeline
from fl.spec import Guarantee, RoundInfo, ValueSpec
from fl.sums.plain import PlainSum
from fl.sums.secagg import SecAgg, SecAggPlus
from fl.testing import PrivacyAssertionError, assert_input_private
from fl.testing.input_privacy import _drive_to_unmask
from fl.testing.strategies import adversarial_unmask_requests
from secagg._hazmat import shamir
from secagg.errors import ProtocolError
from secagg.machine import SERVER, Message
from secagg.masking.client import SecAggClient
from secagg.masking.messages import UnmaskRequest, UnmaskResponse
from secagg.masking.server import SecAggServer
from secagg.plain import PlainClient

CHECKS = ("1 uploads uniform", "2 one kind of share per client", "3 adversarial requests refused",
          "4 ledger matches the run")


def _statuses(text: str) -> dict[str, str]:
    return {name: line.split("]")[0].strip(" [") for line in text.splitlines() for name in CHECKS if name in line}


def _failing(ssum: Any) -> dict[str, str]:
    with pytest.raises(PrivacyAssertionError) as info:
        assert_input_private(ssum)
    return _statuses(str(info.value))


# ---------------------------------------------------------------- correct code passes
@pytest.mark.parametrize("ssum", [SecAgg(threshold=0.7), SecAggPlus(), SecAgg(threshold=0.7, authenticated=True)],
                         ids=["secagg", "secagg+", "secagg-auth"])
def test_correct_secure_sums_pass_every_check(ssum: Any) -> None:
    report = assert_input_private(ssum)
    assert [c.status for c in report.checks] == ["pass"] * 4
    assert "mask-key shares of [5]" in report.checks[1].detail  # the dropout made the server ask for s-shares


def test_a_pipeline_is_checked_on_its_quantized_ring() -> None:
    """Clip + Quantize(16) for 6 clients: a 19-bit ring, so the top byte lane has 3 bits."""
    report = assert_input_private(Pipeline([Clip(l2=1.0), Quantize(bits=16)], sum=SecAggPlus()))
    assert [c.status for c in report.checks] == ["pass"] * 4
    assert "Z_2^19" in report.checks[0].detail


def test_bad_targets_and_sizes_are_refused_clearly() -> None:
    with pytest.raises(TypeError, match="Pipeline or a SecureSum"):
        assert_input_private(object())
    with pytest.raises(ValueError, match="at least 4"):
        assert_input_private(SecAgg(), clients=3)


def test_a_sum_with_a_key_holder_is_refused_not_judged() -> None:
    from fl.sums.paillier import PaillierSum

    with pytest.raises(TypeError, match="Paillier key holder"):
        assert_input_private(PaillierSum(key_bits=1024))


# ---------------------------------------------------------------- planted bug: plain sum (check 1)
def test_a_sum_that_passes_inputs_through_fails_the_uniformity_check() -> None:
    with pytest.raises(PrivacyAssertionError) as info:
        assert_input_private(PlainSum())
    text = str(info.value)
    assert _statuses(text)["1 uploads uniform"] == "FAIL"
    assert "2 of 256 values seen" in text and "in the clear" in text
    assert _statuses(text)["4 ledger matches the run"] == "pass"  # PlainSum honestly claims nothing


def test_a_real_valued_plain_pipeline_fails_check_1_naming_the_dtype() -> None:
    with pytest.raises(PrivacyAssertionError, match="float64 vectors, not words of a ring"):
        assert_input_private(Pipeline([Clip(l2=1.0)]))


@dataclass(frozen=True)
class SharedMask(PlainSum):
    """Planted bug: every client adds the same uniform mask (each upload alone is uniform)."""

    def client(self, cid: int, value: Any, *, spec: ValueSpec, session: bytes, round: int) -> Any:
        assert spec.modulus is not None
        m = np.random.default_rng(0).integers(0, spec.modulus, spec.size, dtype=np.uint64)
        return PlainClient(cid, (value.astype(np.uint64) + m) & np.uint64(spec.modulus - 1), session, round)


def test_a_mask_shared_by_the_clients_fails_check_1_on_the_pair_differences() -> None:
    with pytest.raises(PrivacyAssertionError) as info:
        assert_input_private(SharedMask())
    text = str(info.value)
    _, pairs = text.split("differences of")
    assert _statuses(text)["1 uploads uniform"] == "FAIL"
    assert "1 of 256 values seen" in pairs  # the shared mask cancels: y_0 - y_1 = 0 - (2^32 - 1) everywhere


# ---------------------------------------------------------------- planted bug: client answers both (check 3)
class AnswersBoth(SecAggClient):
    """Planted bug: answers an unmask request naming a client both alive and dropped (skips that refusal)."""

    def _on_unmask(self, msg: UnmaskRequest) -> list[Message]:
        if not set(msg.alive) & set(msg.dropped):
            return super()._on_unmask(msg)
        b_sh = tuple(shamir.encode_share(self._held[v][0]) for v in msg.alive)
        s_sh = tuple(shamir.encode_share(self._held[v][1]) for v in msg.dropped)
        self._held.clear()
        return [UnmaskResponse(self.cid, SERVER, self._session, self._round, msg.alive, b_sh, msg.dropped, s_sh)]


@dataclass(frozen=True)
class BuggyClients(SecAgg):
    def client(self, cid: int, value: Any, *, spec: ValueSpec, session: bytes, round: int) -> Any:
        c = SecAgg.client(self, cid, value, spec=spec, session=session, round=round)
        c.__class__ = AnswersBoth
        return c


def test_a_client_answering_alive_and_dropped_fails_exactly_check_3() -> None:
    st = _failing(BuggyClients(threshold=0.7))
    assert st == {CHECKS[0]: "pass", CHECKS[1]: "pass", CHECKS[2]: "FAIL", CHECKS[3]: "pass"}
    with pytest.raises(PrivacyAssertionError, match=r"both alive and dropped: client 0 ANSWERED \(UnmaskResponse"):
        assert_input_private(BuggyClients(threshold=0.7))


# ---------------------------------------------------------------- planted bug: server asks for both (check 2)
class AsksBoth(SecAggServer):
    """Planted bug: the first unmask request also asks for the mask key of a survivor."""

    def _unmask_requests(self, responders: set[int]) -> list[Message]:
        out = super()._unmask_requests(responders)
        first = out[0]
        assert isinstance(first, UnmaskRequest)
        victim = max(v for v in first.alive if v != first.recipient)
        out[0] = self._requests[first.recipient] = dataclasses.replace(
            first, dropped=tuple(sorted({*first.dropped, victim})))
        return out


@dataclass(frozen=True)
class GreedyServer(SecAgg):
    def server(self, cids: Any, *, spec: ValueSpec, session: bytes, round: int) -> Any:
        s = SecAgg.server(self, cids, spec=spec, session=session, round=round)
        s.__class__ = AsksBoth
        return s


def test_a_server_asking_for_both_kinds_of_share_fails_exactly_check_2() -> None:
    """Honest clients refuse it (check 3 passes), but asking is the flaw check 2 names."""
    st = _failing(GreedyServer(threshold=0.7))
    assert st == {CHECKS[0]: "pass", CHECKS[1]: "FAIL", CHECKS[2]: "pass", CHECKS[3]: "pass"}


@dataclass(frozen=True)
class GreedyServerBuggyClients(BuggyClients):
    server = GreedyServer.server


def test_a_server_holding_both_kinds_is_reported_with_the_victim() -> None:
    with pytest.raises(PrivacyAssertionError, match=r"asked for self-mask and mask-key shares of client\(s\) \[4\]"):
        assert_input_private(GreedyServerBuggyClients(threshold=0.7))


# ---------------------------------------------------------------- planted bug: ledger states another t (check 4)
@dataclass(frozen=True)
class LyingLedger(SecAgg):
    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Guarantee, ...]:
        (g,) = SecAgg.guarantees(self, spec, info)
        return (dataclasses.replace(g, params={**g.params, "t": g.params["t"] - 1}),)


def test_a_ledger_stating_another_t_fails_exactly_check_4() -> None:
    st = _failing(LyingLedger(threshold=0.7))
    assert st == {CHECKS[0]: "pass", CHECKS[1]: "pass", CHECKS[2]: "pass", CHECKS[3]: "FAIL"}


@dataclass(frozen=True)
class ClaimsForOne(SecAgg):
    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Guarantee, ...]:
        return SecAgg.guarantees(self, spec, dataclasses.replace(info, included=info.planned))  # ignores dropouts


def test_a_ledger_claiming_privacy_for_one_included_client_fails_check_4() -> None:
    with pytest.raises(PrivacyAssertionError, match="one client's update"):
        assert_input_private(ClaimsForOne(threshold=0.7))


@dataclass(frozen=True)
class LaxServer(SecAgg):
    """Planted bug: the server is built with a lower threshold than the clients use."""

    def server(self, cids: Any, *, spec: ValueSpec, session: bytes, round: int) -> Any:
        return SecAgg.server(SecAgg(threshold=0.5), cids, spec=spec, session=session, round=round)


def test_a_server_using_another_t_than_its_clients_fails_check_4() -> None:
    with pytest.raises(PrivacyAssertionError, match=r"the clients derived t = \[5\] but the server machine used t = 3"):
        assert_input_private(LaxServer(threshold=0.7))


# ---------------------------------------------------------------- the strategy
SPEC = ValueSpec(size=8, cohort=6, domain="ring", modulus=1 << 32, value_bits=16)


def _client_at_unmask(ssum: Any) -> tuple[SecAggClient, UnmaskRequest, int]:
    vals = {c: np.full(8, c, np.uint64) for c in range(6)}
    srv = ssum.server(sorted(vals), spec=SPEC, session=b"s", round=1)
    cls = {c: ssum.client(c, v, spec=SPEC, session=b"s", round=1) for c, v in vals.items()}
    reqs = _drive_to_unmask(srv, cls, {5})
    return cls[0], reqs[0], srv.threshold


_HONEST = _client_at_unmask(SecAgg(threshold=0.7))


@settings(max_examples=60, deadline=None)
@given(adversarial_unmask_requests(_HONEST[1], t=_HONEST[2]))
def test_honest_client_refuses_every_adversarial_unmask_request(req: UnmaskRequest) -> None:
    client, honest, _ = _HONEST
    assert req != honest
    with pytest.raises(ProtocolError):
        client.receive(req)


def test_the_strategy_finds_the_planted_bug() -> None:
    """The same property over fresh planted clients fails: the strategy does draw the requests that matter."""
    ssum = BuggyClients(threshold=0.7)
    _, honest, t = _client_at_unmask(ssum)

    @settings(max_examples=40, deadline=None, database=None)
    @given(adversarial_unmask_requests(honest, t=t))
    def refused_by_fresh_planted_client(req: UnmaskRequest) -> None:
        client, _, _ = _client_at_unmask(ssum)
        with pytest.raises(ProtocolError):
            client.receive(req)

    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        refused_by_fresh_planted_client()
