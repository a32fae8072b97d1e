"""assert_ledger on real run reports, requirement parsing, and assert_dp's argument checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fl.config import PrivacyConfig, TrainConfig
from fl.testing import (
    DpRequirement,
    InputPrivacyRequirement,
    PrivacyAssertionError,
    assert_dp,
    assert_ledger,
    parse_requirement,
)
from fl.training.loop import train

POLICY = ["input privacy against the server", "(eps <= 3, delta <= 1e-5) at example level for the released model"]


@pytest.fixture(scope="module")
def reports() -> dict[str, Any]:
    def run(spec: str, clients: int) -> Any:
        return train(TrainConfig(dataset="breast_cancer", clients=clients, rounds=1, lr=1.0,
                                 privacy=PrivacyConfig(spec=spec, epsilon=3)))

    return {"dp-sgd,secagg+": run("dp-sgd,secagg+", 5), "clip,noise": run("clip,noise", 20)}


@pytest.mark.slow
def test_real_report_meets_the_policy(reports: dict[str, Any], tmp_path: Path) -> None:
    assert_ledger(reports["dp-sgd,secagg+"], requires=POLICY)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(reports["dp-sgd,secagg+"], default=str))
    assert_ledger(path, requires=POLICY)  # the JSON of `privagg train --report` works too


@pytest.mark.slow
def test_real_report_without_the_guarantee_fails_naming_it(reports: dict[str, Any]) -> None:
    with pytest.raises(PrivacyAssertionError, match="input privacy against the server") as err:
        assert_ledger(reports["clip,noise"], requires=POLICY)
    assert "lacks 2 required guarantee(s)" in str(err.value)  # central noise: client level, not the server
    assert_ledger(reports["clip,noise"], requires=["(eps <= 3, delta <= 1e-5) at client level for the released model"])
    with pytest.raises(PrivacyAssertionError):
        assert_ledger(reports["clip,noise"], requires=["(eps <= 3, delta <= 1e-5) at client level for the server"])
    with pytest.raises(PrivacyAssertionError):
        assert_ledger(reports["dp-sgd,secagg+"], requires=["(eps <= 2, delta <= 1e-5) at example level"])


def test_an_explicit_observer_field_is_honoured() -> None:
    g = {"layer": "x", "property": "(1, 1e-06)-DP at client level", "against": "anyone",
         "params": {"epsilon": 1.0, "delta": 1e-6, "observer": "released model"}}
    assert_ledger({"guarantees": [g]}, requires=["(eps <= 1, delta <= 1e-6) at client level for the released model"])
    with pytest.raises(PrivacyAssertionError):
        assert_ledger({"guarantees": [g]}, requires=["(eps <= 1, delta <= 1e-6) for the server"])


def test_requirements_parse_or_name_the_forms() -> None:
    assert parse_requirement("input privacy against the server") == InputPrivacyRequirement("server")
    assert parse_requirement("(ε <= 3, δ <= 1e-5)-DP at example level") == DpRequirement(3.0, 1e-5, "example", None)
    with pytest.raises(ValueError, match="input privacy against the server"):
        parse_requirement("private enough")
    with pytest.raises(ValueError, match="guarantees"):
        assert_ledger({"final": {}}, requires=POLICY)


def test_assert_dp_names_what_it_accepts() -> None:
    with pytest.raises(TypeError, match="DP-SGD training function"):
        assert_dp(lambda x: x, epsilon=1.0, delta=1e-5, seed=0)
    with pytest.raises(ValueError, match="effort"):
        assert_dp(lambda x: x, epsilon=1.0, delta=1e-5, effort="huge")
    with pytest.raises(ValueError, match="epsilon"):
        assert_dp(lambda x: x, epsilon=0.0, delta=1e-5)


def _g(layer: str, eps: float | None, against: str = "the server and anyone who sees the released model",
       **params: Any) -> dict[str, Any]:
    p = {"epsilon": eps, "delta": 1e-6, **params} if eps is not None else dict(params)
    prop = f"({eps}, 1e-06)-DP at example level" if eps is not None else "no DP: the server learns the sums"
    return {"layer": layer, "property": prop, "against": against, "params": p}


def test_preprocessing_statistics_compose_with_training_and_never_meet_a_requirement_alone() -> None:
    need = ["(eps <= 1, delta <= 2e-6) at example level for the released model"]
    stats = _g("federated-statistics", 0.3, epsilon_server=0.6)
    assert_ledger({"guarantees": [stats, _g("dp-sgd", 0.7)]}, requires=need)  # 0.3 + 0.7 <= 1
    with pytest.raises(PrivacyAssertionError):  # 0.3 + 0.8 > 1: the statistics are charged
        assert_ledger({"guarantees": [stats, _g("dp-sgd", 0.8)]}, requires=need)
    with pytest.raises(PrivacyAssertionError):  # no training DP: the statistics alone do not make the model DP
        assert_ledger({"guarantees": [stats, _g("plain-sum", None)]}, requires=need)
    with pytest.raises(PrivacyAssertionError):  # the server, seeing each site's vector, is charged epsilon_server
        assert_ledger({"guarantees": [stats, _g("dp-sgd", 0.7)]},
                      requires=["(eps <= 1, delta <= 2e-6) at example level for the server"])
    with pytest.raises(PrivacyAssertionError):  # statistics without DP: nothing built on them is DP
        assert_ledger({"guarantees": [_g("federated-statistics", None), _g("dp-sgd", 0.7)]}, requires=need)
    public = {"layer": "public-standardization", "property": "no site data read", "against": "everyone",
              "params": {"sites_read": 0}}
    assert_ledger({"guarantees": [public, _g("dp-sgd", 1.0)]}, requires=need)  # reads no site: costs nothing
