"""A node's policy judges the (k, t) a job will really use, also when SecAgg+ picks them itself.

Before, SecAgg+ without ``--threshold`` (t from the exact-tail parameter finder) reached the policy as
"threshold None", which every policy refuses. Then it was judged by t / (k + 1) >= 1/2, a rule meant for
the complete graph, and the default node refused SecAgg+ at n = 10 (the finder's t = 2 of a share group
of 5 is secure: one corrupt neighbour cannot reach t). Now a sparse SecAgg+ graph is judged by the
security bits its (k, t) keep under the NODE's assumed corrupt and dropout fractions (the adversary: a
server that names a lower t, or claims fewer corrupt clients so that the finder picks a weaker graph).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from fl.runners.flower.policy import NodePolicy, PolicyError, sum_terms
from fl.sums.secagg import SecAgg, SecAggPlus
from secagg.masking.graph import achieved_bits


@pytest.mark.parametrize("cohort", [3, 10, 20, 100, 1000])
@pytest.mark.parametrize("authenticated", [False, True])
def test_the_default_node_accepts_the_parameter_finders_choice(cohort: int, authenticated: bool) -> None:
    ssum = SecAggPlus(authenticated=authenticated)
    k, t = ssum._graph().parameters(cohort, None)
    terms = sum_terms(ssum, cohort)
    assert terms.graph == (k, t)
    NodePolicy().check(terms)  # accepted (at n = 10: k = 4, t = 2, below the old t >= 1/2 rule)
    if k < cohort - 1:  # sparse: the bound the docstring states, recomputed here
        c, d = max(1, cohort // 10), cohort // 10
        bits = achieved_bits(cohort, k, t, corrupt=c / cohort, dropout=d / cohort, active=authenticated)[0]
        assert bits >= 40 and NodePolicy().secagg_plus_bits(cohort, k, t, active=authenticated) == bits


def test_the_finders_choice_at_ten_clients_is_what_the_old_rule_refused() -> None:
    terms = sum_terms(SecAggPlus(), 10)
    assert terms.graph == (4, 2) and terms.threshold_fraction == pytest.approx(0.4)
    NodePolicy().check(terms)


@pytest.mark.parametrize(("cohort", "below"), [(10, 1), (20, 2), (100, 10), (1000, 27)])
def test_a_threshold_below_the_finders_secure_choice_is_refused(cohort: int, below: int) -> None:
    k, t = SecAggPlus()._graph().parameters(cohort, None)
    assert below == t - 1
    terms = sum_terms(SecAggPlus(threshold=below), cohort)  # an absolute count, one below the finder's t
    assert terms.graph == (k, below)
    with pytest.raises(PolicyError, match=rf"SecAgg\+ with k={k} neighbours and threshold t={below} for {cohort} "
                                          r"planned clients keeps \d+\.\d bits .* below its minimum 40"):
        NodePolicy().check(terms)


@pytest.mark.parametrize("cohort", [10, 100, 1000])
def test_a_job_claiming_fewer_corrupt_clients_does_not_weaken_the_node(cohort: int) -> None:
    """The job's corrupt/dropout fractions steer the finder to a weaker graph; the node uses its own."""
    weak = SecAggPlus(corrupt=0.01, dropout=0.01)
    terms = sum_terms(weak, cohort)
    assert terms.graph != sum_terms(SecAggPlus(), cohort).graph
    with pytest.raises(PolicyError, match="corrupt client"):
        NodePolicy().check(terms)
    NodePolicy(assumed_corrupt=0.01, assumed_dropout=0.01).check(terms)  # a node that assumes as little: accepts


def test_a_stricter_node_refuses_what_the_default_accepts() -> None:
    terms = sum_terms(SecAggPlus(), 1000)  # 41.6 bits under (0.1, 0.1)
    NodePolicy().check(terms)
    with pytest.raises(PolicyError, match="below its minimum 60"):
        NodePolicy(min_security_bits=60).check(terms)
    with pytest.raises(PolicyError, match=r"assumed fractions 0\.2 and 0\.1"):
        NodePolicy(assumed_corrupt=0.2).check(terms)


def test_complete_graphs_keep_the_threshold_fraction_rule() -> None:
    """SecAgg, and SecAgg+ whose graph is complete (n = 3: k = 2 = n - 1), are judged by t / n as before."""
    assert sum_terms(SecAggPlus(), 3).graph == (2, 2)
    with pytest.raises(PolicyError, match=r"threshold 0\.4 is below this node's minimum 0\.5"):
        NodePolicy().check(sum_terms(SecAgg(threshold=0.4), 10))
    with pytest.raises(PolicyError, match=r"threshold 0\.6 is below this node's minimum 0\.7"):
        NodePolicy(min_threshold=0.7).check(sum_terms(SecAggPlus(threshold=0.6), 3))
    NodePolicy().check(sum_terms(SecAgg(threshold=0.5), 10))


def test_an_explicit_threshold_is_unchanged() -> None:
    assert sum_terms(SecAggPlus(threshold=0.6), 10).threshold_fraction == 0.6
    assert sum_terms(SecAgg(threshold=0.7), 10).threshold_fraction == 0.7
    assert sum_terms(SecAgg(threshold=0.7), 10).graph is None


@pytest.mark.parametrize("bad", [{"min_security_bits": 0}, {"min_security_bits": math.inf}, {"assumed_corrupt": 1.0},
                                 {"assumed_dropout": -0.1}, {"assumed_corrupt": 0.6, "assumed_dropout": 0.5},
                                 {"assumed_corrupt": True}])
def test_bad_assumptions_are_refused_naming_the_field(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad)) if len(bad) == 1 else "below 1"):
        NodePolicy(**bad)  # type: ignore[arg-type]


def test_the_assumptions_load_from_a_policy_file() -> None:
    policy = NodePolicy.from_dict({"min_security_bits": 50, "assumed_corrupt": 0.2, "assumed_dropout": 0.05})
    assert (policy.min_security_bits, policy.assumed_corrupt, policy.assumed_dropout) == (50, 0.2, 0.05)


def _local_job(monkeypatch: pytest.MonkeyPatch, *extra: str) -> Any:
    """The job ``privagg flower local --clients 10 --privacy clip,dnoise,secagg+ ...`` submits."""
    from fl.cli import flower as flower_cli

    monkeypatch.setattr(flower_cli, "release_statistics", lambda config: None)  # no preprocessing round here
    parser = argparse.ArgumentParser()
    flower_cli.add_arguments(parser)
    return flower_cli._job(parser.parse_args(["local", "--insecure", "--clients", "10", "--privacy",
                                              "clip,dnoise,secagg+", "--noise-multiplier", "1", "--clip", "1",
                                              *extra]))


def test_a_default_node_joins_a_flower_local_secagg_plus_job_of_ten(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ClientApp's hello on a node without a policy file: the job is accepted. A job whose stated
    corrupt and dropout fractions make the finder pick a weaker graph (k = 2) is refused, naming the bits (a
    threshold below the finder's t = 2 here is t = 1, which the sum itself already refuses)."""
    from tests.adversary.flower_harness import deliver, instruction, node_context, server_identity

    server_identity(monkeypatch)
    job = _local_job(monkeypatch)
    ctx = node_context(tmp_path, 100, 3, 10, job.to_json())  # no policy-file: the defaults
    reply = deliver(instruction(100, "query.privagg_hello", {"hello": 1}), ctx)
    assert not reply.has_error(), reply.error.reason
    assert reply.content["privagg"]["cid"] == 3
    weak = _local_job(monkeypatch, "--corrupt-fraction", "0.01", "--dropout-fraction", "0.01")
    ctx = node_context(tmp_path, 101, 4, 10, weak.to_json())
    reply = deliver(instruction(101, "query.privagg_hello", {"hello": 1}), ctx)
    assert reply.has_error()
    assert "k=2 neighbours and threshold t=2 for 10 planned clients keeps 0.0 bits" in reply.error.reason


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("cohort", [10, 100, 1000])
def test_the_mod_judges_secagg_plus_like_a_privagg_job(cohort: int, threshold: float) -> None:
    """privagg_mod's terms carry the (k, t) of the SecAgg+ graph they will use, so a node judges a user's
    app by the same security bits as a privagg sum job with that sum object (not by t/n alone)."""
    from fl.runners.flower.mod import SecureTerms
    from fl.runners.flower.policy import graph_of

    mod_terms = SecureTerms(protocol="secagg+", threshold=threshold, cohort=cohort).job_terms()
    job_terms = sum_terms(SecAggPlus(threshold=threshold), cohort)
    assert mod_terms.graph == job_terms.graph == graph_of(SecAggPlus(threshold=threshold), cohort)
    policy = NodePolicy()
    assert policy.refusals(mod_terms) == policy.refusals(job_terms)
