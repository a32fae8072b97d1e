"""The DP tokens of --privacy: composition errors, calibration, forced uniform weighting."""

from __future__ import annotations

import pytest

from fl.config import PrivacyConfig, TrainConfig
from fl.layers.clip import Clip, Quantize
from fl.layers.noise import GaussianNoise
from fl.privacy.accounting import DpFedAvgAccounting, DpSgdAccounting
from fl.privacy.plan import build_plan
from fl.spec import CompositionError, RoundInfo
from fl.training.dp_sgd import DpSgdTrainer

SIZES = {0: 90, 1: 100, 2: 40, 3: 120, 4: 105}


def plan(spec: str, **kw: object):  # type: ignore[no-untyped-def]
    rounds = kw.pop("rounds", 10)
    cfg = TrainConfig(clients=5, rounds=rounds, privacy=PrivacyConfig(spec=spec, **kw))  # type: ignore[arg-type]
    return build_plan(cfg, size=62, population=5, client_sizes=SIZES)


@pytest.mark.parametrize("spec", ["noise", "dnoise,secagg", "noise,clip"])
def test_noise_without_clip_names_the_fix(spec: str) -> None:
    with pytest.raises(CompositionError, match=r"--privacy .*put Clip\(l2=\.\.\.\) before GaussianNoise"):
        plan(spec, noise_multiplier=1.0)


def test_noise_needs_a_level() -> None:
    with pytest.raises(CompositionError, match="--noise-multiplier Z or --epsilon"):
        plan("clip,noise")
    with pytest.raises(CompositionError, match="not both"):
        plan("clip,noise", noise_multiplier=1.0, epsilon=1.0)


def test_central_noise_plan() -> None:
    p = plan("clip,noise", noise_multiplier=1.3, clip=0.7)
    layers = p.pipeline.layers
    assert isinstance(layers[0], Clip) and isinstance(layers[1], GaussianNoise)
    assert layers[1].placement == "server" and layers[1].multiplier == 1.3
    assert p.weighting == "uniform"
    assert isinstance(p.accounting, DpFedAvgAccounting)


def test_distributed_noise_with_secagg_plan_and_calibration() -> None:
    p = plan("clip,dnoise,secagg", epsilon=3.0, rounds=8)
    layers = p.pipeline.layers
    assert [type(x).__name__ for x in layers] == ["Clip", "GaussianNoise", "Quantize"]
    assert layers[1].placement == "clients" and layers[1].shares == 5
    assert p.pipeline.sum.name.startswith("secagg")
    acc = p.accounting
    assert isinstance(acc, DpFedAvgAccounting)
    assert acc.floor(5) == 4  # threshold 0.7 of 5: the budget must hold with 4 survivors
    for r in range(1, 9):
        i = RoundInfo(round=r, planned=tuple(range(5)), included=tuple(range(4)), population=5, sample_rate=1.0)
        assert acc.can_run(i)[0]
        acc.record(i, {})
    assert 2.9 < acc.spent()[0] <= 3.0
    assert any("calibrated" in n for n in p.notes)


def test_dp_sgd_plan_calibrates_each_client() -> None:
    p = plan("dp-sgd,secagg+", epsilon=1.0, dpsgd_batch_size=32, rounds=5)
    assert isinstance(p.trainer, DpSgdTrainer)
    assert isinstance(p.accounting, DpSgdAccounting)
    assert isinstance(p.pipeline.layers[-1], Quantize)
    z = p.trainer.noise_multiplier
    assert isinstance(z, dict) and set(z) == set(SIZES)
    assert z[2] != z[3]  # different local sizes, different rates and steps
    assert p.weighting is None


def test_dp_sgd_needs_a_noise_level_and_not_two_ledgers() -> None:
    with pytest.raises(CompositionError, match="--dpsgd-noise-multiplier"):
        plan("dp-sgd")
    with pytest.raises(CompositionError, match="not both"):
        plan("dp-sgd,clip,noise", noise_multiplier=1.0, dpsgd_noise_multiplier=1.0)


@pytest.mark.parametrize("spec", ["none", "clip", "clip,quantize", "secagg+"])
def test_non_dp_tokens_unchanged(spec: str) -> None:
    p = plan(spec)
    assert p.accounting is None and p.trainer is None and p.weighting is None
    assert not any(isinstance(x, GaussianNoise) for x in p.pipeline.layers)


def test_unknown_token_lists_the_choices() -> None:
    with pytest.raises(CompositionError, match="dnoise"):
        plan("clip,laplace")
