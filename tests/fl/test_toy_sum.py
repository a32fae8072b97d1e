"""A new secure sum needs only its own module plus one registration line in ``fl.privacy.plan.STAGES``.

``ToySum`` (test-only, never for real use) is pairwise-free zero-sum masking under a key the clients
pre-share and the server does not know: client i sends ``x_i + r_i - r_{i+1 mod n}`` in the ring, the
masks cancel in the sum of the full cohort, and a round missing anyone is aborted (its own rule,
stated by ``min_included``). Nothing else in ``fl`` knows about it: the plan builds it from its
registration, ``Pipeline.bind`` checks the order, the loop runs it, and the ledger carries its own
guarantee.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from dp.rng import SecureRandom
from fl.config import PrivacyConfig, TrainConfig
from fl.errors import CompositionError
from fl.privacy.plan import STAGES, Stage, build_plan
from fl.spec import Guarantee, RoundInfo, ValueSpec
from fl.training.loop import Federation, train
from secagg.errors import AbortError
from secagg.machine import ClientMachine, ServerMachine
from secagg.plain import PlainClient, PlainServer

PRE_SHARED = "toy-key-the-server-never-sees"


def _mask(cid: int, n: int, session: bytes, size: int) -> NDArray[np.uint64]:
    def r(j: int) -> NDArray[np.uint64]:
        return SecureRandom.for_testing(f"{PRE_SHARED}:{session.hex()}:{j % n}").uint64(size)

    return r(cid) - r(cid + 1)  # wraps mod 2^64; the ring modulus divides 2^64


@dataclass(frozen=True)
class ToySum:
    """Zero-sum masks under a pre-shared client key; every planned client must be included."""

    @property
    def name(self) -> str:
        return "toy"

    @property
    def hides_updates(self) -> bool:
        return True

    def bind(self, spec: ValueSpec) -> ValueSpec:
        if spec.domain != "ring" or spec.modulus is None:
            raise CompositionError("ToySum sums ring values: put Quantize before it")
        if spec.cohort < 2:
            raise CompositionError("ToySum needs a cohort of at least 2")
        return spec

    def min_included(self, spec: ValueSpec) -> int:
        return spec.cohort  # no dropout recovery: all or nothing

    def client(self, cid: int, value: NDArray[Any], *, spec: ValueSpec, session: bytes, round: int) -> ClientMachine:
        assert spec.modulus is not None
        masked = (np.asarray(value, dtype=np.uint64) + _mask(cid, spec.cohort, session, spec.size)) & np.uint64(
            spec.modulus - 1)
        return PlainClient(cid, masked, session, round)

    def server(self, cids: Sequence[int], *, spec: ValueSpec, session: bytes, round: int) -> ServerMachine:
        if sorted(cids) != list(range(spec.cohort)):
            raise AbortError("start", needed=spec.cohort, answered=len(cids), reason="ToySum needs every client")
        return PlainServer(list(cids), spec.size, session, round, min_clients=len(cids), modulus=spec.modulus)

    def parties(self, *, spec: ValueSpec, session: bytes, round: int) -> Mapping[int, ClientMachine]:
        return {}

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Guarantee, ...]:
        return (Guarantee(layer=self.name, property="the server learns only the sum of the full cohort",
                          against="an honest-but-curious server", assumptions=("clients pre-share a key",)),)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STAGES, "toy", Stage.secure_sum(lambda ctx: ToySum()))  # the one registration line


def _config(spec: str, noise_multiplier: float | None = None, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"dataset": "breast_cancer", "clients": 3, "rounds": 2, "seed": 2, "model": "logreg",
                            "insecure_seeded_randomness": True}
    return TrainConfig(**{**base, **kw}, privacy=PrivacyConfig(spec=spec, clip=2.0, noise_multiplier=noise_multiplier))


def test_unregistered_the_word_is_unknown() -> None:
    with pytest.raises(CompositionError, match="unknown privacy stage"):
        build_plan(_config("toy"), size=62, population=3, client_sizes={0: 1, 1: 1, 2: 1})


def test_the_toy_sum_trains_the_same_model_as_the_plain_sum(toy: None) -> None:
    """Masks cancel exactly: the model equals SecAgg's (same implied clip and quantize, and the same
    secure-sum path for the federated statistics)."""
    masked, plain = Federation(_config("toy")), Federation(_config("secagg"))
    assert masked.plan.pipeline.name == "clip(l2=2),quantize(bits=20),toy"  # the implied clip + quantize before a sum
    for r in (1, 2):
        masked.run_round(r)
        plain.run_round(r)
    np.testing.assert_array_equal(masked.params, plain.params)
    claims = [g["layer"] for g in masked.report(baseline=None)["guarantees"]]
    assert "toy" in claims  # its own guarantee, nothing guessed from its name


def test_the_server_sees_only_masked_values(toy: None) -> None:
    spec = ValueSpec(size=8, cohort=3, domain="ring", modulus=1 << 20, value_bits=16)
    values = {c: np.arange(8, dtype=np.uint64) for c in range(3)}
    machines = {c: ToySum().client(c, v, spec=spec, session=b"s" * 16, round=1) for c, v in values.items()}
    sent = {c: m.start()[0] for c, m in machines.items()}
    for c in range(3):
        assert not np.array_equal(np.asarray(sent[c].value), values[c])
    total = sum(np.asarray(sent[c].value, dtype=np.uint64) for c in range(3)) & np.uint64((1 << 20) - 1)
    np.testing.assert_array_equal(total, 3 * np.arange(8, dtype=np.uint64))


def test_its_own_rules_order_and_minimum(toy: None) -> None:
    """Order is Pipeline.bind's (the layers' own rules); the DP worst case is the sum's own floor."""
    sizes = {0: 1, 1: 1, 2: 1}
    with pytest.raises(CompositionError, match="Clip works on real vectors: put it before Quantize"):
        build_plan(_config("clip,quantize,clip,toy"), size=62, population=3, client_sizes=sizes)
    plan = build_plan(_config("clip,dnoise,toy", noise_multiplier=1.0), size=62, population=3, client_sizes=sizes)
    assert plan.accounting is not None and plan.accounting.floor(3) == 3  # type: ignore[attr-defined]
    secagg = build_plan(_config("clip,dnoise,secagg", noise_multiplier=1.0), size=62, population=3,
                        client_sizes=sizes)
    assert secagg.accounting.floor(3) == 3 and secagg.accounting.floor(10) == 7  # type: ignore[union-attr]


def test_a_round_missing_a_client_releases_nothing(toy: None) -> None:
    report = train(_config("toy", dropout=0.5, rounds=3), baseline=False)
    assert any("aborted" in r for r in report["rounds"])
    assert all(r["included"] in (0, 3) for r in report["rounds"])
