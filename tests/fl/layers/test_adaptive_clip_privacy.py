"""Adaptive clipping's privacy: the noisy count is charged exactly, measured, audited and resumable.

The recomputations use ``dp_accounting`` directly (helpers of ``tests/fl/test_dp_recompute.py``) from the
report as written to disk; the noise measurements run the real pipeline; planted bugs (the count's
coordinate not in the sensitivity, the count released without noise) make the checks fail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dp_accounting import dp_event

from dp.accounting import compute_epsilon
from dp.audit import Claim, gdp_audit
from dp.rng import SecureRandom
from fl.config import PrivacyConfig, TrainConfig
from fl.layers.adaptive_clip import AdaptiveClip
from fl.layers.noise import RELEASED, GaussianNoise
from fl.pipeline import Pipeline
from fl.privacy.accounting import DpFedAvgAccounting
from fl.privacy.plan import build_plan
from fl.spec import CompositionError, RoundInfo, ValueSpec
from fl.training.loop import Federation, format_round, train
from tests.fl.test_dp_recompute import TOL, check_entries, observers, pld, released, run, training_epsilon


def joint(update_multiplier: float, count_std: float) -> float:
    """The one Gaussian's multiplier from its two parts: z^-2 = z_update^-2 + (2 sigma_b)^-2 (Andrew et al.)."""
    return float((update_multiplier**-2 + (2 * count_std) ** -2) ** -0.5)


# ---- the report recomputes --------------------------------------------------------------------------


def stated_poisson_epsilon(rep: Mapping[str, Any]) -> float:
    """Epsilon rebuilt from the mechanism the report states: the update's and the count's noise, q, rounds."""
    mech = rep["privacy"]["mechanisms"][0]
    ac = mech["adaptive_clip"]
    z = joint(ac["update_noise_multiplier"], ac["count_noise_std"])
    step = dp_event.PoissonSampledDpEvent(mech["sample_rate"], dp_event.GaussianDpEvent(z))
    return pld(dp_event.SelfComposedDpEvent(step, mech["steps"]), rep["privacy"]["delta"])


def test_aclip_noise_poisson_recomputes_from_the_report(tmp_path: Path) -> None:
    rep = run(tmp_path, "aclip,noise", noise_multiplier=1.0, sample_rate=0.5, clip=0.5, rounds=5)
    check_entries(rep)
    assert stated_poisson_epsilon(rep) == pytest.approx(training_epsilon(rep), abs=TOL)
    mech = rep["privacy"]["mechanisms"][0]
    ac = mech["adaptive_clip"]
    s = AdaptiveClip(count_noise=ac["count_noise"]).sensitivity
    assert ac["update_noise_multiplier"] == pytest.approx(1.0 * s)  # the update pays for the count: z * S > z
    assert ac["count_noise_std"] == pytest.approx(2.0 * 1.0)  # --aclip-count-noise 2 (default) x z
    rounds = released(rep)
    assert mech["steps"] == len(rounds) >= 3
    assert rounds[0]["clip"] == 0.5
    for r in rounds:  # the geometric update, from the noisy clipped fraction the round line shows
        assert 0 <= r["clipped_fraction"] <= 1
        assert r["next_clip"] == pytest.approx(r["clip"] * math.exp(-0.2 * (1 - r["clipped_fraction"] - 0.5)))
    assert [r["clip"] for r in rounds[1:]] == [r["next_clip"] for r in rounds[:-1]]
    assert rep["layer_state"][0]["clip"] == pytest.approx(rounds[-1]["next_clip"])


def test_aclip_dnoise_secagg_plus_with_dropouts_recomputes_from_the_report(tmp_path: Path) -> None:
    rep = run(tmp_path, "aclip,dnoise,secagg+", noise_multiplier=1.0, dropout=0.3, threshold=0.5, clients=8)
    check_entries(rep)
    rounds = released(rep)
    assert any(r["included"] < r["planned"] for r in rounds), "the seeded run has dropouts"
    shares = rep["privacy"]["mechanisms"][0]["shares"]
    for r in rounds:  # each round line states what the survivors' noise was, split in its two parts
        s = AdaptiveClip().sensitivity
        assert r["update_noise_multiplier"] == pytest.approx(s * math.sqrt(r["included"] / shares))
    # the server knows the sample: each round one unamplified Gaussian, rebuilt from the two parts
    stated = dp_event.ComposedDpEvent(
        [dp_event.GaussianDpEvent(joint(r["update_noise_multiplier"], r["count_noise_std"])) for r in rounds]
    )
    server = observers(rep)["server"]
    assert pld(stated, 1e-5) == pytest.approx(server["epsilon"], abs=TOL)
    assert training_epsilon(rep) == pytest.approx(server["epsilon"])


def test_planted_bug_count_not_charged_fails_the_recomputation(tmp_path: Path, monkeypatch: Any) -> None:
    """If the count's coordinate were left out of the sensitivity, the report's own numbers betray it."""
    monkeypatch.setattr(AdaptiveClip, "sensitivity", property(lambda self: 1.0))
    rep = run(tmp_path, "aclip,noise", noise_multiplier=1.0, sample_rate=0.5, clip=0.5, rounds=5)
    check_entries(rep)  # the ledger is self-consistent ...
    assert stated_poisson_epsilon(rep) > training_epsilon(rep) + 10 * TOL  # ... but charges too little


# ---- the noise on the sum, measured -----------------------------------------------------------------


def plan_for(spec: str, *, count_noise: float = 2.0, clients: int = 4, size: int = 40) -> Any:
    config = TrainConfig(clients=clients, rounds=3, privacy=PrivacyConfig(
        spec=spec, noise_multiplier=1.0, clip=2.0, aclip_count_noise=count_noise))
    return build_plan(config, size=size, population=clients, client_sizes=dict.fromkeys(range(clients), 10))


def measured_parts(plan: Any, *, trials: int, clients: int = 4, size: int = 40) -> tuple[float, float, float]:
    """(update multiplier, count std, true count) of the real pipeline's noise, over ``trials`` rounds."""
    bound = plan.pipeline.bind(ValueSpec(size=size, cohort=clients))
    layer = bound.pipeline.layers[0]
    state = bound.initialize()
    clip = state[0]["clip"]
    ups = [np.full(size, (i + 1) * clip / math.sqrt(size) * 0.6) for i in range(clients)]  # norms .6, 1.2 ...
    exact = sum(u / max(1.0, float(np.linalg.norm(u)) / clip) for u in ups)
    unclipped = sum(float(np.linalg.norm(u)) <= clip for u in ups)
    ids = tuple(range(clients))
    info = RoundInfo(round=1, planned=ids, included=ids, population=clients, sample_rate=1.0)
    src = SecureRandom.for_testing("aclip-measure")
    dev, counts = [], []
    for _ in range(trials):
        total = sum(bound.encode(u, src, state) for u in ups)
        out, nxt = bound.advance(total, info, src, state)
        dev.append((out - exact) / clip)
        counts.append(nxt[0]["unclipped_count"])
    assert isinstance(layer, AdaptiveClip)
    return float(np.std(dev)), float(np.std(np.array(counts) - unclipped)), float(unclipped)


def check_noise_matches_ledger(plan: Any, trials: int = 600) -> None:
    """The noise the pipeline adds is the noise the ledger charges (5%: ~4 standard errors)."""
    acc: DpFedAvgAccounting = plan.accounting
    ids = tuple(range(4))
    info = RoundInfo(round=1, planned=ids, included=ids, population=4, sample_rate=1.0)
    update, count, _ = measured_parts(plan, trials=trials)
    stated = acc.adaptive_split(info)
    assert update == pytest.approx(stated["update_noise_multiplier"], rel=0.05)
    assert count == pytest.approx(stated["count_noise_std"], rel=0.05)
    charged = acc._steps(info)[RELEASED].noise_multiplier
    assert joint(update, count) == pytest.approx(charged, rel=0.05)


@pytest.mark.parametrize("spec", ["aclip,noise", "aclip,dnoise"])
def test_measured_noise_is_what_the_ledger_charges(spec: str) -> None:
    check_noise_matches_ledger(plan_for(spec, count_noise=0.75))


def leave_count_noiseless(monkeypatch: Any) -> None:
    """Planted bug: the noise layer skips the last coordinate, so the count is released exactly."""
    noise = GaussianNoise._noise

    def leaky(self: GaussianNoise, n: int, std: float, spec: ValueSpec, rng: Any) -> Any:
        out = noise(self, n, std, spec, rng)
        out[-1] = 0.0
        return out

    monkeypatch.setattr(GaussianNoise, "_noise", leaky)


@pytest.mark.parametrize("spec", ["aclip,noise", "aclip,dnoise"])
def test_planted_bugs_fail_the_noise_measurement(spec: str, monkeypatch: Any) -> None:
    with monkeypatch.context() as m:
        leave_count_noiseless(m)
        with pytest.raises(AssertionError):
            check_noise_matches_ledger(plan_for(spec, count_noise=0.75))
    with monkeypatch.context() as m:
        m.setattr(AdaptiveClip, "sensitivity", property(lambda self: 1.0))
        with pytest.raises(AssertionError):
            check_noise_matches_ledger(plan_for(spec, count_noise=0.75))


# ---- a Gaussian-DP canary audit of the mechanism ------------------------------------------------------


def aclip_canary_run(layer: AdaptiveClip, z: float, *, canaries: int, rounds: int,
                     rng: SecureRandom) -> Any:
    """``run(mask)`` for :func:`dp.audit.gdp_audit`: one real aclip -> noise pipeline per canary.

    Each instance has a background client (zero update: not clipped) and, if included, the canary,
    which sends ``10 C_t`` every round (clipped). The canary moves the released (update / C_t, count
    coordinate) by ``v = (1, -c/2)``; its score adds ``<y, v> / |v|^2`` over the rounds, so a correct
    mechanism gives scores ``rounds + N(0, rounds z^2)`` with the canary and ``N(0, rounds z^2)`` without.
    """
    c = layer.count_scale
    v2 = 1 + c**2 / 4  # |v|^2, computed here, not taken from the layer
    pipeline = Pipeline([layer, GaussianNoise(multiplier=z)])

    def run(mask: Any) -> Any:
        bound = pipeline.bind(ValueSpec(size=1, cohort=2))
        scores = np.zeros(canaries)
        for k in range(canaries):
            state = bound.initialize()
            for r in range(rounds):
                clip = state[0]["clip"]
                total = bound.encode(np.zeros(1), rng, state)
                if mask[k]:
                    total = total + bound.encode(np.array([10.0 * clip]), rng, state)
                n = 1 + int(mask[k])
                info = RoundInfo(round=r, planned=tuple(range(n)), included=tuple(range(n)), population=2,
                                 sample_rate=1.0)
                out, state = bound.advance(total, info, rng, state)
                y_count = c * (state[0]["unclipped_count"] - n / 2)  # the released coordinate itself
                scores[k] += (out[0] / clip - c / 2 * y_count) / v2
        return scores

    return run


def audit(layer: AdaptiveClip, z: float, claimed: float, rounds: int, seed: str) -> Any:
    rng = SecureRandom.for_testing(seed)
    run_fn = aclip_canary_run(layer, z, canaries=400, rounds=rounds, rng=rng)
    return gdp_audit(run_fn, canaries=400, releases=rounds, runs=4, confidence=0.999, rng=rng,
                     claim=Claim(epsilon=claimed, delta=1e-5, releases=rounds))


@pytest.mark.slow
def test_gdp_canary_audit_of_aclip_stays_below_the_claim_and_catches_planted_bugs(monkeypatch: Any) -> None:
    z, rounds = 1.0, 3
    layer = AdaptiveClip(initial_clip=1.0, count_noise=0.75)  # a large count share: bugs are visible
    claimed = compute_epsilon(noise_multiplier=z, delta=1e-5, sample_rate=1.0, steps=rounds)  # what is charged
    ok = audit(layer, z, claimed, rounds, "aclip-audit-ok")
    assert ok.epsilon_lower_bound <= claimed
    assert ok.details["noise_multiplier_measured"] == pytest.approx(z, rel=0.1)
    with monkeypatch.context() as m:
        leave_count_noiseless(m)
        assert audit(layer, z, claimed, rounds, "aclip-audit-leak").epsilon_lower_bound > claimed
    with monkeypatch.context() as m:
        m.setattr(AdaptiveClip, "sensitivity", property(lambda self: 1.0))
        assert audit(layer, z, claimed, rounds, "aclip-audit-uncharged").epsilon_lower_bound > claimed


# ---- state: checkpoints, resume, the round line, the CLI ----------------------------------------------


def aclip_config(**kw: Any) -> TrainConfig:
    return TrainConfig(clients=6, rounds=4, seed=3, insecure_seeded_randomness=True, **kw,
                       privacy=PrivacyConfig(spec="aclip,noise", clip=0.2, noise_multiplier=1.0,
                                             aclip_quantile=0.7))


def test_state_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    cfg = aclip_config()
    full = train(cfg, baseline=False)
    fed = Federation(cfg)
    for r in (1, 2):
        fed.run_round(r)
    assert fed.layer_state[0]["round"] == 2
    fed.save(tmp_path)
    fresh = Federation(cfg)
    assert fresh.layer_state[0] == {"clip": 0.2, "round": 0}
    fresh.load(tmp_path)
    assert fresh.layer_state == fed.layer_state  # restored, not restarted at the initial norm
    resumed = train(cfg, checkpoint_dir=tmp_path, resume=True, baseline=False)
    assert [r["clip"] for r in resumed["rounds"]] == [r["clip"] for r in full["rounds"]]
    assert resumed["layer_state"] == full["layer_state"]
    assert resumed["final"] == full["final"]


def test_a_checkpoint_without_the_state_is_refused(tmp_path: Path) -> None:
    import torch

    cfg = aclip_config()
    fed = Federation(cfg)
    fed.run_round(1)
    fed.save(tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del state["layer_state"]
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="does not fit"):
        Federation(cfg).load(tmp_path)


def test_round_line_shows_the_noisy_clipped_fraction_and_plain_clip_does_not(tmp_path: Path) -> None:
    fed = Federation(aclip_config())
    record = fed.run_round(1)
    assert record["clip"] == 0.2 and 0 <= record["clipped_fraction"] <= 1
    line = format_round(record, 4)
    assert "clip 0.2" in line and f"clipped {record['clipped_fraction']:.2f}" in line
    plain = Federation(replace(aclip_config(), privacy=PrivacyConfig(spec="clip,noise", noise_multiplier=1.0)))
    rec = plain.run_round(1)
    assert "clipped_fraction" not in rec and "clipped" not in format_round(rec, 4)


def test_clipped_fraction_is_noisy_not_an_exact_count() -> None:
    """The same updates give different fractions: it comes from the noisy sum (an exact count would leak).

    Fresh randomness each run; the fraction is clamped to [0, 1], so one run in a few lands on a bound and
    four runs could (rarely) all land on the same one: ten runs make that chance negligible.
    """
    fracs = set()
    for seed in range(10):
        fed = Federation(replace(aclip_config(), seed=seed, insecure_seeded_randomness=False))
        fracs.add(round(fed.run_round(1)["clipped_fraction"], 12))
    assert len(fracs) > 1


@pytest.mark.parametrize(("spec", "match"), [
    ("aclip", "add noise or dnoise"),
    ("aclip,secagg+", "add noise or dnoise"),
    ("clip,aclip,noise", "one clipping stage"),
])
def test_cli_refuses_aclip_without_noise_or_with_clip(spec: str, match: str) -> None:
    cfg = TrainConfig(clients=3, privacy=PrivacyConfig(spec=spec, noise_multiplier=1.0 if "noise" in spec else None))
    with pytest.raises(CompositionError, match=match):
        build_plan(cfg, size=4, population=3, client_sizes=dict.fromkeys(range(3), 5))


def test_cli_flags_reach_the_layer() -> None:
    from fl.cli.main import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--privacy", "aclip,dnoise,secagg+", "--epsilon", "4", "--clip",
                                      "0.3", "--aclip-quantile", "0.8", "--aclip-lr", "0.1"])
    cfg = config_from_args(args)
    plan = build_plan(cfg, size=10, population=5, client_sizes=dict.fromkeys(range(5), 20))
    layer = plan.pipeline.layers[0]
    assert layer == AdaptiveClip(target_quantile=0.8, initial_clip=0.3, learning_rate=0.1, count_noise=2.0)
    assert plan.accounting.spec.size == 11 and plan.accounting.spec.l2_bound == layer.sensitivity
    with pytest.raises(CompositionError, match="aclip-quantile"):
        build_plan(replace(cfg, privacy=replace(cfg.privacy, aclip_quantile=2.0)), size=10, population=5,
                   client_sizes=dict.fromkeys(range(5), 20))


def test_flower_refuses_aclip_until_it_ships_the_state() -> None:
    """Over Flower each node would encode with the initial norm while the server decodes with C_t."""
    pytest.importorskip("flwr")
    from fl.runners.flower import FlowerJob, JobError
    from fl.runners.flower.job import train_config

    job = FlowerJob(config={"clients": 3, "privacy": {"spec": "aclip,noise", "noise_multiplier": 1.0}})
    with pytest.raises(JobError, match="aclip"):
        train_config(job)


def test_epsilon_calibration_with_aclip_meets_the_budget(tmp_path: Path) -> None:
    rep = run(tmp_path, "aclip,noise", epsilon=3.0, sample_rate=0.5, clip=0.5, rounds=4, stats_epsilon=0.5)
    check_entries(rep)
    assert stated_poisson_epsilon(rep) == pytest.approx(training_epsilon(rep), abs=TOL)
    assert rep["final"]["epsilon"] <= 3.0 + 1e-9
    assert any("adaptive clipping" in n for n in rep["notes"])


def test_sweep_without_noise_drops_aclip_too() -> None:
    from fl.cli.sweep import _config_for

    base = TrainConfig(privacy=PrivacyConfig(spec="aclip,noise,secagg+", noise_multiplier=1.0))
    assert _config_for(base, math.inf, 0).privacy.tokens() == ("secagg+",)
    assert _config_for(base, 2.0, 0).privacy.tokens() == ("aclip", "noise", "secagg+")
