"""A node's policy judges the threshold a job will really use, also when SecAgg+ picks (k, t) itself.

Before, SecAgg+ without ``--threshold`` (t from the exact-tail parameter finder) reached the policy as
"threshold None", which every policy refuses: the default node refused every such job over Flower.
"""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from fl.runners.flower.policy import NodePolicy, PolicyError, sum_terms
from fl.sums.secagg import SecAgg, SecAggPlus


@pytest.mark.parametrize("cohort", [3, 10, 100])
def test_secagg_plus_without_a_threshold_is_judged_by_its_own_t(cohort: int) -> None:
    k, t = SecAggPlus()._graph().parameters(cohort, None)
    terms = sum_terms(SecAggPlus(), cohort)
    assert terms.threshold_fraction == pytest.approx(t / (k + 1))
    policy = NodePolicy()
    if t / (k + 1) >= policy.min_threshold:
        policy.check(terms)  # accepted: the default policy's t >= n/2 holds for this group
    else:
        with pytest.raises(PolicyError, match=f"threshold {t / (k + 1)}"):
            policy.check(terms)  # refused, naming the actual fraction (not "None")


def test_an_explicit_threshold_is_unchanged() -> None:
    assert sum_terms(SecAggPlus(threshold=0.6), 10).threshold_fraction == 0.6
    assert sum_terms(SecAgg(threshold=0.7), 10).threshold_fraction == 0.7
