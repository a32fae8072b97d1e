"""The fl adapters SecAgg / SecAggPlus: composition checks, guarantees, graph degree choice, identity keys."""

from __future__ import annotations

import math

import numpy as np
import pytest

import secagg
from fl.layers.clip import Clip, Quantize
from fl.pipeline import Pipeline
from fl.runners.local import run_secure_sum
from fl.spec import CompositionError, RoundInfo, ValueSpec
from fl.sums.secagg import SecAgg, SecAggPlus
from secagg.masking.graph import achieved_bits, choose_k, find_parameters


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
    (g,) = SecAggPlus().guarantees(spec, info)
    assert g.layer == "secagg+" and "only the sum" in g.property and "honest-but-curious" in g.against
    k, t = find_parameters(1000, corrupt=0.1, dropout=0.1, sigma=40, eta=30)
    assert g.params["k"] == k and g.params["t"] == t and k < 999
    assert g.params["sigma_bits"] >= 40 and g.params["eta_bits"] >= 30
    assert any(a.startswith("t = ") for a in g.assumptions) and any("neighbours" in a for a in g.assumptions)
    assert any(f"security 2^-{g.params['sigma_bits']:.1f}" in a for a in g.assumptions)
    (g5,) = SecAggPlus(threshold=0.5).guarantees(spec, info)
    assert g5.params["t"] == math.ceil(0.5 * (k + 1))  # an explicit threshold overrides t, bits restated
    (ga,) = SecAgg(authenticated=True).guarantees(spec, info)
    assert "active" in ga.against and ga.params["k"] == 999
    assert g.as_dict()["params"]["n"] == 1000


def test_degree_is_of_order_log_n_and_meets_the_stated_bits() -> None:
    ns = (10**3, 10**4, 10**5, 10**6)
    params = [find_parameters(n, corrupt=0.1, dropout=0.1, sigma=40, eta=30) for n in ns]
    ks = [k for k, _ in params]
    assert ks == sorted(ks) and ks[-1] < 100  # grows like log n
    for n, (k, t) in zip(ns, params, strict=True):
        sec, cor = achieved_bits(n, k, t, dropout=0.1, corrupt=0.1)
        assert sec >= 40 and cor >= 30
        assert all(  # k is the smallest even degree for which some threshold works
            min(achieved_bits(n, k - 2, tt, dropout=0.1, corrupt=0.1)) < 30
            or achieved_bits(n, k - 2, tt, dropout=0.1, corrupt=0.1)[0] < 40
            for tt in range(2, k)
        )
    assert choose_k(1000) == ks[0]  # the compat wrapper
    assert find_parameters(4, corrupt=0.3, dropout=0.3) == (3, 2)  # too small to be sparse: the complete graph


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
