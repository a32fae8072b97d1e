"""Federated standardization statistics: exact without DP, only through the sum, noisy and accounted with DP."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest
from dp_accounting.pld import PLDAccountant
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from sklearn.preprocessing import StandardScaler

from dp.rng import SecureRandom
from fl.data.stats import Schema, StatsPrivacy, federated_statistics, sensitivity, site_vector
from fl.spec import Guarantee, RoundInfo, ValueSpec
from fl.sums.paillier import PaillierSum
from fl.sums.plain import PlainSum
from fl.sums.secagg import SecAgg, SecAggPlus
from secagg.machine import ClientMachine, ServerMachine


def _seeded(label: str) -> Callable[[int], SecureRandom]:
    """Per-site CSPRNGs through the named test seam (reproducible noise for the tests)."""
    return lambda k: SecureRandom.for_testing(f"{label}:{k}")


SCHEMA = Schema(target="y", numeric=("a", "b"), categorical=("city",))


def make_sites(seed: int, sizes: Sequence[int]) -> list[pd.DataFrame]:
    rng = np.random.default_rng(seed)
    return [
        pd.DataFrame({"a": rng.normal(10 * k, 3, n), "b": rng.exponential(100, n),
                      "city": rng.choice(["x", "y", "z"][: 2 + k % 2], n), "y": rng.integers(0, 2, n)})
        for k, n in enumerate(sizes)
    ]


@dataclass
class RecordingSum:
    """A plain sum that records what each site hands over and what the server computes."""

    inner: PlainSum = field(default_factory=PlainSum)
    handed: dict[int, NDArray[Any]] = field(default_factory=dict)
    servers: list[ServerMachine] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "recording-sum"

    def bind(self, spec: ValueSpec) -> ValueSpec:
        return self.inner.bind(spec)

    def client(self, cid: int, value: NDArray[Any], *, spec: ValueSpec, session: bytes, round: int) -> ClientMachine:
        self.handed[cid] = np.array(value, copy=True)
        return self.inner.client(cid, value, spec=spec, session=session, round=round)

    def server(self, cids: Sequence[int], *, spec: ValueSpec, session: bytes, round: int) -> ServerMachine:
        srv = self.inner.server(cids, spec=spec, session=session, round=round)
        self.servers.append(srv)
        return srv

    def parties(self, *, spec: ValueSpec, session: bytes, round: int) -> Mapping[int, ClientMachine]:
        return {}

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Guarantee, ...]:
        return ()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(1, 60), min_size=1, max_size=6))
def test_federated_statistics_equal_pooled_without_dp(seed: int, sizes: list[int]) -> None:
    sites = make_sites(seed, sizes)
    stats = federated_statistics(sites, SCHEMA, secure_sum=PlainSum(), reference=sites[0])
    pooled = pd.concat(sites, ignore_index=True)
    ref = StandardScaler().fit(pooled[["a", "b"]].to_numpy())
    np.testing.assert_allclose(stats.mean, ref.mean_, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.std, ref.scale_, rtol=1e-9, atol=1e-9)
    assert stats.vocabulary["city"] == tuple(sorted(pooled["city"].unique()))
    assert stats.rows == len(pooled)
    np.testing.assert_allclose(stats.transform(pooled)[:, :2], ref.transform(pooled[["a", "b"]].to_numpy()),
                               rtol=1e-5, atol=1e-5)


def test_sites_statistics_leave_them_only_through_the_sum() -> None:
    """The curious server: it gets one fixed-size vector per site (no rows), and the result is a function
    of the sum alone -- moving rows between sites, with the same total, changes nothing."""
    sites = make_sites(1, [30, 50, 20])
    rec = RecordingSum()
    stats = federated_statistics(sites, SCHEMA, secure_sum=rec, reference=sites[0])
    width = 2 * 2 + 3  # [sum u, sum u^2] per numeric column + one count per candidate category
    assert sorted(rec.handed) == [0, 1, 2]
    assert all(v.shape == (width,) for v in rec.handed.values())
    # each handed vector is computed from that site's rows alone
    centre, w = _ranges(stats, sites[0])
    for k, site in enumerate(sites):
        own = site_vector(site, SCHEMA, centre=centre, width=w, candidates=stats.vocabulary, clip=False,
                          unit="example")
        np.testing.assert_allclose(rec.handed[k], own)
    pooled = pd.concat(sites, ignore_index=True)
    moved = [pooled.iloc[:10], pooled.iloc[10:95], pooled.iloc[95:]]
    again = federated_statistics(moved, SCHEMA, secure_sum=PlainSum(), reference=sites[0])
    np.testing.assert_allclose(again.mean, stats.mean, rtol=1e-12)
    np.testing.assert_allclose(again.std, stats.std, rtol=1e-12)


def _ranges(stats: Any, reference: pd.DataFrame) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    from fl.data.stats import public_ranges

    return public_ranges(SCHEMA, declared={}, reference=reference)


@pytest.mark.parametrize("ssum", [SecAgg(threshold=0.7), SecAggPlus(threshold=0.7),
                                  pytest.param(PaillierSum(), marks=pytest.mark.slow)],
                         ids=["secagg", "secagg+", "paillier"])
def test_statistics_through_secagg_match_pooled(ssum: Any) -> None:
    sites = make_sites(2, [40, 25, 35, 30])
    bounds = {"a": (-50.0, 100.0), "b": (0.0, 2000.0)}  # public ranges covering every row: nothing clipped
    stats = federated_statistics(sites, SCHEMA, secure_sum=ssum, bounds=bounds,
                                 rng_for=lambda k: SecureRandom.for_testing(f"t{k}"))
    pooled = pd.concat(sites, ignore_index=True)
    np.testing.assert_allclose(stats.mean, pooled[["a", "b"]].mean().to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(stats.std, pooled[["a", "b"]].std(ddof=0).to_numpy(), rtol=1e-9)
    assert stats.guarantee.params["sum"] == ssum.name
    assert "no single site's vector" in stats.guarantee.property


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=4, max_size=4), st.lists(st.floats(-1e6, 1e6), min_size=4, max_size=4),
       st.sampled_from(["x", "y", "q"]), st.sampled_from(["x", "y", "q"]))
def test_replacing_one_row_moves_a_site_vector_by_at_most_the_sensitivity(
    row: list[float], other: list[float], cat: str, other_cat: str
) -> None:
    schema = Schema(target="y", numeric=("a", "b", "c", "d"), categorical=("city",))
    base = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "c": [0.0, 0.0], "d": [5.0, 5.0], "city": ["x", "y"]})
    one = pd.concat([base, pd.DataFrame([[*row, cat]], columns=base.columns)], ignore_index=True)
    two = pd.concat([base, pd.DataFrame([[*other, other_cat]], columns=base.columns)], ignore_index=True)
    kw: dict[str, Any] = {"centre": np.array([0.0, 10.0, -3.0, 100.0]), "width": np.array([4.0, 20.0, 1.0, 50.0]),
                          "candidates": {"city": ("x", "y")}, "clip": True}
    for unit in ("example", "client"):
        gap = site_vector(one, schema, unit=unit, **kw) - site_vector(two, schema, unit=unit, **kw)
        assert np.linalg.norm(gap) <= sensitivity(schema) + 1e-12
    # client level: replacing the whole site moves its (averaged) vector by at most the same bound
    gap = site_vector(one, schema, unit="client", **kw) - site_vector(two.iloc[2:], schema, unit="client", **kw)
    assert np.linalg.norm(gap) <= sensitivity(schema) + 1e-12


def test_dp_statistics_carry_the_stated_noise_and_event() -> None:
    """Playing the observer of the total: the noise on the summed vector has std z * sensitivity, and the
    epsilon of the event (recomputed with dp_accounting's PLD) is the one the guarantee states."""
    sites = make_sites(3, [20, 20, 20])
    schema = Schema(target="y", numeric=("a", "b"))
    privacy = StatsPrivacy.for_epsilon(1.0, delta=1e-5)
    centre = np.array([20.0, 500.0])
    width = np.array([80.0, 1000.0])
    bounds = {c: (m - w / 2, m + w / 2) for c, m, w in zip(("a", "b"), centre, width, strict=True)}
    exact = sum(site_vector(s, schema, centre=centre, width=width, candidates={}, clip=True, unit="example")
                for s in sites)
    noise = []
    for rep in range(300):
        rec = RecordingSum()

        federated_statistics(sites, schema, secure_sum=rec, privacy=privacy, bounds=bounds, rng_for=_seeded(str(rep)))
        noise.append(sum(rec.handed.values()) - exact)
    sigma = privacy.noise_multiplier * sensitivity(schema)
    measured = float(np.std(np.asarray(noise)))
    assert abs(measured / sigma - 1) < 0.08
    stats = federated_statistics(sites, schema, secure_sum=PlainSum(), privacy=privacy, bounds=bounds)
    acc = PLDAccountant()
    acc.compose(stats.event)
    assert stats.guarantee.params["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), abs=1e-3)
    assert stats.guarantee.params["epsilon"] <= 1.0 + 1e-9
    # plain-sum: the server sees each site's vector with only its share of the noise, and the text says so
    assert stats.guarantee.params["epsilon_server"] > stats.guarantee.params["epsilon"]
    assert "each site's vector" in stats.guarantee.against


def test_dp_needs_declared_categories_and_drops_rare_ones() -> None:
    sites = make_sites(4, [50, 50])
    privacy = StatsPrivacy(noise_multiplier=0.5, delta=1e-5)
    with pytest.raises(ValueError, match="--categories city="):
        federated_statistics(sites, SCHEMA, secure_sum=PlainSum(), privacy=privacy, reference=sites[0])
    stats = federated_statistics(sites, SCHEMA, secure_sum=PlainSum(), privacy=privacy, reference=sites[0],
                                 categories={"city": ["x", "y", "never-seen"]}, min_category_count=10)
    assert stats.vocabulary["city"] == ("x", "y")  # the empty category's noisy count is far below 10
    out = stats.transform(pd.DataFrame({"a": [0.0], "b": [1.0], "city": ["never-seen"]}))
    assert out.shape == (1, 4) and out[0, 2:].tolist() == [0.0, 0.0]  # unknown -> all zeros ("other")


def test_dp_unit_follows_the_run_and_client_level_weighs_sites_equally() -> None:
    sites = make_sites(5, [10, 90])
    privacy = StatsPrivacy(noise_multiplier=1e4, delta=1e-5, unit="client")  # huge z, but noise is tested above
    stats = federated_statistics(sites, Schema(target="y", numeric=("a",)), secure_sum=PlainSum(),
                                 privacy=StatsPrivacy(noise_multiplier=1e-9, delta=1e-5, unit="client"),
                                 bounds={"a": (-100.0, 100.0)})
    site_means = [float(s["a"].mean()) for s in sites]
    assert stats.mean[0] == pytest.approx(np.mean(site_means), rel=1e-6)  # mean of site means
    assert "each client" in federated_statistics(
        sites, Schema(target="y", numeric=("a",)), secure_sum=PlainSum(), privacy=privacy,
        bounds={"a": (-100.0, 100.0)}).guarantee.property
    assert math.isfinite(stats.std[0])


def test_dp_estimates_shrink_to_the_prior_on_small_data_and_converge_on_large() -> None:
    """Noise never makes a scale explode: small data fall back towards width / 8, large data keep their std."""
    schema = Schema(target="y", numeric=("a",))
    bounds = {"a": (-40.0, 40.0)}  # width 80: the prior std is 10
    privacy = StatsPrivacy.for_epsilon(0.5, delta=1e-5)
    rng = np.random.default_rng(0)
    for rep in range(30):
        small = [pd.DataFrame({"a": rng.normal(0, 2, 10)})]
        stats = federated_statistics(small, schema, secure_sum=PlainSum(), privacy=privacy, bounds=bounds,
                                     rng_for=_seeded(f"s{rep}"))
        assert 80 / 16 <= stats.std[0] <= 80 / 2
    large = [pd.DataFrame({"a": rng.normal(3, 12, 20_000)}) for _ in range(3)]
    stats = federated_statistics(large, schema, secure_sum=PlainSum(), privacy=privacy, bounds=bounds)
    assert stats.mean[0] == pytest.approx(3, abs=0.3) and stats.std[0] == pytest.approx(12, rel=0.05)


def test_a_vocabulary_whose_counts_all_fall_below_the_floor_keeps_its_candidates() -> None:
    """Regression: DP noise could push every count of a declared column below the floor, leaving an empty
    vocabulary that crashed the one-hot encoder (IndexError) instead of training."""
    from fl.data.stats import Schema, _vocabulary

    schema = Schema(numeric=(), categorical=("smoker",), target="y")
    vocab = _vocabulary(schema, {"smoker": ("no", "yes")}, np.array([-3.0, 0.5]), minimum=1.0)
    assert vocab == {"smoker": ("no", "yes")}
    assert _vocabulary(schema, {"smoker": ("no", "yes")}, np.array([5.0, 0.5]), minimum=1.0) == {"smoker": ("no",)}


# ---------------------------------------------------------------- public standardization (reads no site)
def test_public_standardization_reads_no_site_and_spends_nothing(tmp_path: Any) -> None:
    from fl.config import PrivacyConfig, TrainConfig
    from fl.data.stats import DataError, public_statistics
    from fl.training.loop import train
    from fl.training.setup import statistics_budget

    schema = Schema(target="y", numeric=("a", "b"), categorical=("c",))
    ref = pd.DataFrame({"a": [0.0, 10.0], "b": [5.0, 5.0], "y": [0, 1], "c": ["u", "v"]})
    stats = public_statistics(schema, bounds={"a": (0.0, 16.0)}, reference=ref, categories={"c": ["u", "v", "w"]})
    # a: declared 0..16 -> centre 8, std 16 / (2 sqrt 3); b: the server's own rows (one value) widened
    assert stats.mean[0] == 8.0 and math.isclose(stats.std[0], 16.0 / (2 * math.sqrt(3)))
    assert stats.vocabulary == {"c": ("u", "v", "w")} and stats.event is None
    x = stats.transform(pd.DataFrame({"a": [0.0, 16.0], "b": [5.0, 5.0], "c": ["u", "w"]}))
    assert np.allclose(x[:, 0], [-math.sqrt(3), math.sqrt(3)], atol=1e-6)  # the range maps to [-sqrt 3, sqrt 3]
    assert stats.guarantee.layer == "public-standardization" and stats.guarantee.params["sites_read"] == 0
    with pytest.raises(DataError, match="--categories c=A,B,C"):
        public_statistics(schema, reference=ref)

    config = TrainConfig(dataset="breast_cancer", clients=3, rounds=1, standardize="public",
                         privacy=PrivacyConfig(spec="dp-sgd", epsilon=2.0), insecure_seeded_randomness=True)
    report = train(config)
    assert "epsilon_preprocessing" not in report["final"]
    assert math.isclose(report["final"]["epsilon"], 2.0, rel_tol=1e-3)  # the whole budget went to training
    assert any(g["layer"] == "public-standardization" for g in report["guarantees"])
    assert statistics_budget(type("D", (), {"stats": stats})()) is None
