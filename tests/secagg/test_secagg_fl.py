"""The fl adapters SecAgg / SecAggPlus: composition checks, guarantees, graph degree choice, identity keys."""

from __future__ import annotations

import math

import numpy as np
import pytest

import secagg
from fl.layers import Clip, Quantize
from fl.pipeline import Pipeline
from fl.runners.local import run_secure_sum
from fl.spec import CompositionError, RoundInfo, ValueSpec
from fl.sums_secagg import SecAgg, SecAggPlus
from secagg.graph import achieved_bits, choose_k


def test_public_names_resolve_and_hazmat_is_not_exported() -> None:
    for name in secagg.__all__:
        assert getattr(secagg, name) is not None
    assert not any("hazmat" in name for name in secagg.__all__)


def test_names_and_ring_requirement() -> None:
    assert SecAgg().name == "secagg" and SecAggPlus().name == "secagg+"
    for ssum in (SecAgg(), SecAggPlus()):
        with pytest.raises(CompositionError, match=r"put Quantize\(bits=...\) before it"):
            ssum.bind(ValueSpec(size=3, cohort=4))
        with pytest.raises(CompositionError, match=r"Quantize"):
            ssum.bind(ValueSpec(size=3, cohort=4, domain="ring", modulus=(1 << 20) + 1, value_bits=10))
        with pytest.raises(CompositionError):
            ssum.bind(ValueSpec(size=3, cohort=4, domain="ring", modulus=1 << 65, value_bits=10))
        spec = Pipeline([Clip(l2=1.0), Quantize(bits=20)], sum=ssum).bind(ValueSpec(size=3, cohort=100)).out_spec
        assert spec.domain == "ring" and spec.modulus == 1 << 27
    with pytest.raises(CompositionError, match="t >= 2"):
        SecAgg(threshold=1).bind(ValueSpec(size=3, cohort=4, domain="ring", modulus=1 << 20, value_bits=10))
    with pytest.raises(CompositionError, match="neighbours"):
        SecAggPlus(neighbours=1).bind(ValueSpec(size=3, cohort=40, domain="ring", modulus=1 << 20, value_bits=10))


def test_guarantees_are_data() -> None:
    info = RoundInfo(round=0, planned=tuple(range(1000)), included=tuple(range(950)), population=5000, sample_rate=0.2)
    spec = ValueSpec(size=3, cohort=1000, domain="ring", modulus=1 << 32, value_bits=20)
    (g,) = SecAggPlus(threshold=0.5).guarantees(spec, info)
    assert g.layer == "secagg+" and "only the sum" in g.property and "honest-but-curious" in g.against
    k = choose_k(1000, threshold=0.5)
    assert g.params["k"] == k and g.params["t"] == math.ceil(0.5 * (k + 1))
    assert g.params["sigma_bits"] >= 40 and g.params["eta_bits"] >= 30
    assert any(a.startswith("t = ") for a in g.assumptions) and any("neighbours" in a for a in g.assumptions)
    (ga,) = SecAgg(authenticated=True).guarantees(spec, info)
    assert "active" in ga.against and ga.params["k"] == 999
    assert g.as_dict()["params"]["n"] == 1000


def test_degree_is_of_order_log_n_and_meets_the_stated_bits() -> None:
    ks = [choose_k(n, threshold=0.5) for n in (10**3, 10**4, 10**5, 10**6)]
    assert ks == sorted(ks) and ks[-1] < 100  # grows like log n
    for n, k in zip((10**3, 10**4, 10**5, 10**6), ks, strict=True):
        sec, cor = achieved_bits(n, k, threshold=0.5, dropout=0.1, corrupt=0.1)
        assert sec >= 40 and cor >= 30
        sec2, cor2 = achieved_bits(n, k - 2, threshold=0.5, dropout=0.1, corrupt=0.1)
        assert sec2 < 40 or cor2 < 30  # k is the smallest even degree that works
    assert choose_k(50, threshold=0.7) == 49  # small cohorts: the complete graph


def test_identity_keys_come_from_a_csprng_per_adapter() -> None:
    a, b = SecAgg(authenticated=True), SecAgg(authenticated=True)
    assert a.registry.private(3) != b.registry.private(3)
    assert a.registry.private(3) == a.registry.private(3)
    assert a == b  # the registry does not take part in equality


def test_secaggplus_runs_through_a_pipeline_with_automatic_degree() -> None:
    n, d = 30, 20
    ssum = SecAggPlus(threshold=0.5)
    bound = Pipeline([Quantize(bits=12, bound=1.0)], sum=ssum).bind(ValueSpec(size=d, cohort=n))
    values = {c: np.full(d, c, dtype=np.uint64) for c in range(n)}
    out = run_secure_sum(ssum, values, spec=bound.sum_spec, session=b"s")
    assert np.all(out.total == sum(range(n)))
