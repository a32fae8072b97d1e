"""A secure sum over fewer than two included clients protects nobody: refused at bind and by the machines."""

from __future__ import annotations

import numpy as np
import pytest

from fl.config import PrivacyConfig, TrainConfig
from fl.privacy.plan import build_plan
from fl.spec import CompositionError, RoundInfo, ValueSpec
from fl.sums.paillier import PaillierSum
from fl.sums.plain import PlainSum
from fl.sums.secagg import SecAgg, SecAggPlus
from secagg.masking.server import SecAggServer
from secagg.paillier import PaillierKeyHolder, PaillierServer, generate_keypair

RING = ValueSpec(size=4, cohort=1, domain="ring", modulus=1 << 24, value_bits=16)


@pytest.mark.parametrize("ssum", [SecAgg(), SecAggPlus(), SecAgg(authenticated=True), PaillierSum(key_bits=1024)])
def test_a_cohort_of_one_is_refused_at_bind(ssum: object) -> None:
    with pytest.raises(CompositionError, match="at least 2"):
        ssum.bind(RING)  # type: ignore[attr-defined]


@pytest.mark.parametrize("token", ["secagg", "secagg+", "paillier"])
def test_the_cli_plan_for_one_client_is_refused(token: str) -> None:
    """``--privacy secagg+ --clients 1`` used to run and claim input privacy."""
    cfg = TrainConfig(clients=1, privacy=PrivacyConfig(spec=token))
    plan = build_plan(cfg, size=4, population=1, client_sizes={0: 10})
    with pytest.raises(CompositionError, match="at least 2"):
        plan.pipeline.bind(ValueSpec(size=4, cohort=1))


def test_min_included_is_the_threshold_and_never_below_two() -> None:
    spec = RING.with_(cohort=10)
    assert SecAgg(threshold=0.7).min_included(spec) == 7
    assert SecAgg(threshold=0.1).min_included(spec) == 2
    assert SecAggPlus(threshold=0.7, neighbours=4).min_included(spec.with_(cohort=100)) == 4
    assert PaillierSum(key_bits=1024).min_included(spec) == 2
    assert PlainSum().min_included(spec) == 1
    with pytest.raises(CompositionError, match=">= 2"):
        PaillierSum(key_bits=1024, min_clients=1)


def test_server_machines_refuse_a_cohort_of_one() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        SecAggServer([3], session=b"s", round=0, modulus=1 << 20, size=4, threshold=1)
    pub, priv = generate_keypair(bits=1024)
    plan = PaillierSum(key_bits=1024).plan(RING.with_(cohort=2))
    with pytest.raises(ValueError, match=r">= 2|cannot reach"):
        PaillierServer([3], 4, b"s", 0, pub, plan)
    with pytest.raises(ValueError, match=">= 2"):
        PaillierServer([3, 4], 4, b"s", 0, pub, plan, min_clients=1)
    with pytest.raises(ValueError, match=">= 2"):
        PaillierKeyHolder(-2, priv, b"s", 0, min_summands=1)


def test_no_ledger_entry_claims_input_privacy_for_a_sum_of_one() -> None:
    spec = RING.with_(cohort=5)
    info = RoundInfo(round=0, planned=tuple(range(5)), included=(3,), population=5, sample_rate=1.0)
    (g,) = SecAgg(threshold=0.4).guarantees(spec, info)
    assert g.property.startswith("none") and g.against == "no one"
    info2 = RoundInfo(round=0, planned=tuple(range(5)), included=(1, 3), population=5, sample_rate=1.0)
    (g2,) = SecAgg(threshold=0.4).guarantees(spec, info2)
    assert g2.property.startswith("input privacy")
    assert np.isfinite(g2.params["t"])


def test_paillier_ledger_claims_nothing_for_a_sum_of_one() -> None:
    from fl.spec import RoundInfo, ValueSpec

    ssum = PaillierSum(key_bits=1024)
    spec = ValueSpec(size=4, cohort=3, domain="ring", modulus=1 << 20, value_bits=16)
    one = RoundInfo(round=1, planned=(0, 1, 2), included=(0,), population=3, sample_rate=1.0)
    (g,) = ssum.guarantees(spec, one)
    assert g.property.startswith("none") and g.against == "no one"
    many = RoundInfo(round=1, planned=(0, 1, 2), included=(0, 1), population=3, sample_rate=1.0)
    assert ssum.guarantees(spec, many)[0].property.startswith("input privacy")
