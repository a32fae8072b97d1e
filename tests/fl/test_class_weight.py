"""--class-weight: weights reach every trainer, bad input is refused, and under DP "balanced" reads only the release.

The adversary of the DP claim: weights computed from a site's raw label counts would let one example move
every other example's weight (per-example clipping does not bound that). The tests check that the weights
are a function of the released statistics alone (neighbouring data sets, one release: the same weights),
that they equal the balanced rule on the released counts, that the release is charged in the one ledger
entry it always had, and that a class-weighted example's clipped gradient still has norm <= C.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import fl.api as api
from dp.sgd import clipped_grad_sum
from fl.cli.main import main
from fl.config import PrivacyConfig, TrainConfig
from fl.data.sites import load_federated
from fl.data.stats import FederatedStats, Schema, sensitivity
from fl.report import summary_lines
from fl.training.class_weights import balanced_weights, normalize_class_weight, resolve_class_weights
from fl.training.client import ClientSide
from fl.training.dp_sgd import DpSgdTrainer
from fl.training.loop import Federation, train
from fl.training.setup import statistics_budget
from fl.training.trainers import PlainTrainer


def _imbalanced(n: int = 1200, minority: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """A 95/5 table whose minority class is shifted by 1 in every feature (learnable, easy to ignore)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < minority).astype(int)
    x = rng.normal(size=(n, 3)) + y[:, None] * 1.0
    df = pd.DataFrame(x, columns=["a", "b", "c"])
    df["label"] = y
    return df


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cw") / "imbalanced.csv"
    _imbalanced().to_csv(path, index=False)
    return path


def _config(path: Path, cw: object = "none", privacy: PrivacyConfig | None = None, **kw: object) -> TrainConfig:
    """The 95/5 table over 4 clients, 4 rounds, under the named seeded seam (no flaky noise)."""
    options: dict[str, object] = {"rounds": 4, **kw}
    return TrainConfig(dataset=f"csv:{path}", target="label", clients=4, class_weight=cw,  # type: ignore[arg-type]
                       insecure_seeded_randomness=True, privacy=privacy or PrivacyConfig(), **options)  # type: ignore[arg-type]


# ---- weights are applied ---------------------------------------------------------------------------------
def test_balanced_weights_raise_balanced_accuracy_on_a_95_5_table(table: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = train(_config(table), baseline=False)
        weighted = train(_config(table, "balanced"), baseline=False)
    assert "class_weight" not in plain
    assert weighted["class_weight"]["spec"] == "balanced"
    w = weighted["class_weight"]["weights"]
    assert w["1"] > 5 * w["0"]  # the minority class weighs more, by about the inverse frequency ratio
    assert weighted["final"]["balanced_accuracy"] > plain["final"]["balanced_accuracy"] + 0.15
    assert weighted["config"]["class_weight"] == "balanced"
    assert "class weights balanced" in summary_lines(weighted)[0]


def test_explicit_weights_through_the_python_api_mapping_and_sequence() -> None:
    df = _imbalanced(900, seed=1)
    x, y = df[["a", "b", "c"]].to_numpy(np.float32), df["label"].to_numpy(np.int64)
    sites = {f"s{i}": (x[p], y[p]) for i, p in enumerate(np.array_split(np.arange(700), 3))}
    test = (x[700:], y[700:])

    def run(cw: object) -> dict[str, Any]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 2))
        res = api.train(model=net, sites=sites, rounds=4, evaluation=test, class_weight=cw,  # type: ignore[arg-type]
                        insecure_seeded_randomness=True, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
        return dict(res.report["final"]) | {"weights": res.report.get("class_weight", {}).get("weights")}

    base, mapped, listed = run(None), run({0: 1, 1: 15}), run([1.0, 15.0])
    assert mapped["weights"] == {"0": 1.0, "1": 15.0} == listed["weights"]
    assert mapped["balanced_accuracy"] == pytest.approx(listed["balanced_accuracy"])  # one weight vector
    assert mapped["balanced_accuracy"] > base["balanced_accuracy"] + 0.15


def test_plain_trainer_weights_scale_each_examples_loss() -> None:
    """One step of SGD on two examples: the weighted gradient is exactly sum_i w[y_i] grad_i / n."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])

    def step(trainer: PlainTrainer) -> torch.Tensor:
        torch.manual_seed(0)
        m = nn.Linear(2, 2)
        w0 = m.weight.detach().clone()
        trainer.train(m, x, y, cid=0, round=1, seed=0)
        return (w0 - m.weight.detach()) / trainer.lr

    g1, g2 = step(PlainTrainer(lr=1.0, batch_size=2)), step(PlainTrainer(lr=1.0, batch_size=2, class_weight=(1.0, 3.0)))
    # example 0 touches column 0 of the weight, example 1 column 1: the weight multiplies only its own column
    assert torch.allclose(g2[:, 0], g1[:, 0]) and torch.allclose(g2[:, 1], 3 * g1[:, 1])


def test_plain_trainer_refuses_a_mean_loss_with_class_weights() -> None:
    t = PlainTrainer(class_weight=(1.0, 2.0), loss=nn.CrossEntropyLoss())  # reduction='mean': one number
    with pytest.raises(ValueError, match="reduction='none'"):
        t.train(nn.Linear(2, 2), torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), cid=0, round=1, seed=0)


# ---- the clip still bounds each example --------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "mlp"), [("direct", False), ("direct", True), ("opacus", True), ("ghost", True)])
def test_class_weighted_per_example_clipped_gradient_norm_is_at_most_c(mode: str, mlp: bool) -> None:
    """Weights 10x on class 1 scale the gradient before clipping: each example's clipped gradient is <= C."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)) if mlp else nn.Sequential(nn.Linear(4, 2))
    x, y, c = 3 * torch.randn(12, 4), torch.tensor([0, 1] * 6), 0.5
    _, plain_norms = clipped_grad_sum(model, x, y, max_grad_norm=c, mode=mode)  # type: ignore[arg-type]
    _, norms = clipped_grad_sum(model, x, y, max_grad_norm=c, mode=mode, class_weight=[1.0, 10.0])  # type: ignore[arg-type]
    factor = torch.where(y == 1, 10.0, 1.0)
    assert torch.allclose(norms, plain_norms * factor, rtol=1e-4)  # weighted before the norm is taken
    for i in range(len(y)):
        grads, _ = clipped_grad_sum(model, x[i:i + 1], y[i:i + 1], max_grad_norm=c, mode=mode,  # type: ignore[arg-type]
                                    class_weight=[1.0, 10.0])
        total = math.sqrt(sum(float((g * g).sum()) for g in grads))
        assert total <= c * (1 + 1e-5)


def test_fast_linear_path_matches_the_generic_path_with_weights() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    fast, n1 = clipped_grad_sum(model, x, y, max_grad_norm=0.3, mode="direct", class_weight=[1.0, 4.0, 0.5])
    slow, n2 = clipped_grad_sum(model, x, y, max_grad_norm=0.3, mode="opacus", class_weight=[1.0, 4.0, 0.5])
    assert torch.allclose(n1, n2, rtol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast, slow, strict=True))


# ---- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "match"), [
    ("0=-1", "finite number > 0"), ("0=0", "finite number > 0"), ("0=nan", "finite number > 0"),
    ("1=inf", "finite number > 0"), ("0=abc", "not a number"), ("0=1,1", "mixes"), ("0=1,0=2", "two weights"),
    ({}, "empty"), ([], "empty"), ({"a,b": 1}, "cannot be named"), (3.5, "must be 'none'"),
])
def test_bad_class_weight_is_refused_naming_the_fix(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        normalize_class_weight(value)
    with pytest.raises(ValueError, match=match):
        TrainConfig(class_weight=value)  # type: ignore[arg-type]


def test_canonical_forms() -> None:
    assert normalize_class_weight(None) == "none" == normalize_class_weight(" None ")
    assert normalize_class_weight("Balanced") == "balanced"
    assert normalize_class_weight({0: 1, 1: 5}) == "0=1.0,1=5.0" == normalize_class_weight("0=1, 1=5")
    assert normalize_class_weight(np.array([1, 5])) == "1.0,5.0"


def test_unknown_class_and_wrong_count_are_refused_before_training(table: Path) -> None:
    with pytest.raises(ValueError, match=r"class\(es\) \['2'\].*classes are 0, 1"):
        Federation(_config(table, "0=1,2=5"))
    with pytest.raises(ValueError, match=r"3 weight.*2 classes"):
        Federation(_config(table, [1, 2, 3]))


def test_cli_refuses_a_bad_weight_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--class-weight", "0=-2", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "privagg: error:" in err and "--class-weight 0=1,1=5" in err and "Traceback" not in err


def test_help_shows_the_option_and_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--class-weight none|balanced|LABEL=W,..." in out and "(default: none)" in out


# ---- under DP: the released statistics only ----------------------------------------------------------------
DPSGD = PrivacyConfig(spec="dp-sgd", epsilon=4.0)


def test_dp_weights_equal_the_rule_on_the_released_counts_not_the_raw_ones(table: Path) -> None:
    fed = Federation(_config(table, "balanced", DPSGD))
    stats = fed.data.stats
    assert stats is not None and stats.event is not None and stats.label_counts is not None
    assert isinstance(fed.trainer, DpSgdTrainer)
    assert fed.trainer.class_weight == balanced_weights(stats.label_counts)
    raw = np.bincount(fed.data.y_train, minlength=2)
    assert not np.allclose(stats.label_counts, raw)  # DP noise: the raw counts were not used
    assert fed.trainer.class_weight != balanced_weights(raw)
    assert fed.run_plan.class_weights is not None and "(DP)" in fed.run_plan.class_weights.source


def test_dp_weights_depend_on_the_data_only_through_the_release(table: Path, tmp_path: Path) -> None:
    """Neighbouring data sets (one label flipped at one site) with the same release give the same weights."""
    config = _config(table, "balanced", DPSGD)
    release = load_federated(config).stats
    assert release is not None
    df = pd.read_csv(table)
    df.loc[df.index[df["label"] == 0][0], "label"] = 1  # one example's label changes
    other = tmp_path / "neighbour.csv"
    df.to_csv(other, index=False)
    mine = resolve_class_weights(config, load_federated(config, stats=release))
    theirs = resolve_class_weights(_config(other, "balanced", DPSGD), load_federated(
        _config(other, "balanced", DPSGD), stats=release))
    assert mine is not None and theirs is not None and mine.weights == theirs.weights


def test_the_release_is_charged_once_in_the_same_entry(table: Path) -> None:
    """Counting labels keeps the statistics' noise multiplier (same epsilon), widens its sensitivity by 2."""
    plain, weighted = load_federated(_config(table, "none", DPSGD)), load_federated(_config(table, "balanced", DPSGD))
    assert plain.stats is not None and weighted.stats is not None
    assert statistics_budget(plain) == statistics_budget(weighted)
    assert str(plain.stats.event) == str(weighted.stats.event)
    schema = weighted.stats.schema
    assert weighted.stats.guarantee.params["sensitivity"] == pytest.approx(sensitivity(schema, labels=True))
    assert sensitivity(schema, labels=True) ** 2 == pytest.approx(sensitivity(schema) ** 2 + 2)
    assert "count of each class label" in weighted.stats.guarantee.property
    assert plain.stats.label_counts is None and "label_counts" not in plain.stats.guarantee.params


def test_every_client_side_and_a_flower_job_use_one_weight_vector(table: Path, tmp_path: Path) -> None:
    """A Flower job carries the config (class_weight as text) and the one release as JSON; every node's
    client side, rebuilt from the job alone, derives the in-memory run's weight vector."""
    from fl.runners.flower import FlowerJob

    config = _config(table, "balanced", DPSGD)
    fed = Federation(config)
    assert fed.data.stats is not None
    job = FlowerJob(task="train", out=str(tmp_path), config=config.as_dict(), stats=fed.data.stats.to_json())
    back = FlowerJob.from_json(job.to_json())
    assert back.config["class_weight"] == "balanced"
    data = dict(back.config)  # what a node rebuilds from the job (fl.runners.flower's ClientApp does the same)
    node_config = TrainConfig(**{**data, "privacy": PrivacyConfig(**data["privacy"])})
    assert back.stats is not None
    release = FederatedStats.from_json(back.stats)
    for cid in range(fed.population):
        side = ClientSide.for_site(node_config, cid, stats=release)
        assert side.trainer.class_weight == fed.trainer.class_weight  # type: ignore[attr-defined]


def test_balanced_under_dp_without_released_counts_is_refused(table: Path) -> None:
    with pytest.raises(ValueError, match="--class-weight 0=1,1=5"):
        Federation(_config(table, "balanced", DPSGD, standardize="public"))
    x, y = _imbalanced(300).pipe(lambda d: (d[["a", "b", "c"]].to_numpy(np.float32), d["label"].to_numpy(np.int64)))
    with pytest.raises(ValueError, match="class counts released with DP"):
        api.train(model=nn.Sequential(nn.Linear(3, 2)), sites={"a": (x[:150], y[:150]), "b": (x[150:], y[150:])},
                  privacy="dp-sgd", epsilon=2.0, class_weight="balanced")


def test_a_dp_sgd_run_with_public_weights_keeps_its_epsilon(table: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = train(_config(table, "none", DPSGD, rounds=1), baseline=False)
        weighted = train(_config(table, "0=1,1=10", DPSGD, rounds=1), baseline=False)
    assert weighted["final"]["epsilon"] == pytest.approx(plain["final"]["epsilon"])
    assert weighted["class_weight"]["source"].startswith("explicit")
    assert weighted["final"]["accuracy"] != plain["final"]["accuracy"] or \
        weighted["rounds"][0]["loss"] != plain["rounds"][0]["loss"]  # the weights reached DP-SGD


def test_stats_release_roundtrips_its_label_counts() -> None:
    schema = Schema(target="y", numeric=("a",))
    sites = [pd.DataFrame({"a": [0.0, 1.0, 2.0], "y": ["p", "q", "q"]}), pd.DataFrame({"a": [3.0], "y": ["p"]})]
    from fl.data.stats import federated_statistics
    from fl.sums.plain import PlainSum

    stats = federated_statistics(sites, schema, secure_sum=PlainSum(), bounds={"a": (0.0, 3.0)}, labels=["p", "q"])
    assert stats.label_counts is not None and list(stats.label_counts) == [2.0, 2.0]
    back = FederatedStats.from_json(json.loads(json.dumps(stats.to_json())))
    assert back.label_classes == ("p", "q") and list(back.label_counts) == [2.0, 2.0]  # type: ignore[arg-type]
    assert list(stats.mean) == pytest.approx([1.5])  # the moments are the same sum as before


def test_cli_run_shows_the_weights_in_the_summary_and_the_json_report(
    table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "r.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["train", "--dataset", f"csv:{table}", "--target", "label", "--rounds", "1", "--clients", "3",
                   "--class-weight", "0=1,1=8", "--no-baselines", "--quiet", "--report", str(report)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "class weights 0=1.0,1=8.0: 0: 1, 1: 8; explicit" in out
    saved = json.loads(report.read_text())
    assert saved["class_weight"]["weights"] == {"0": 1.0, "1": 8.0} and saved["config"]["class_weight"] == "0=1.0,1=8.0"


def test_a_release_without_class_counts_is_refused_not_recounted(table: Path) -> None:
    """A release made without labels= (an older job or checkpoint) cannot silently fall back to raw counts."""
    config = _config(table, "balanced", DPSGD)
    old = load_federated(_config(table, "none", DPSGD)).stats
    assert old is not None and old.label_counts is None
    with pytest.raises(ValueError, match="made without class counts"):
        resolve_class_weights(config, load_federated(config, stats=old))


def test_resume_keeps_the_released_weights(table: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = train(_config(table, "balanced", rounds=1), baseline=False, checkpoint_dir=tmp_path)
        resumed = train(_config(table, "balanced", rounds=2), baseline=False, checkpoint_dir=tmp_path, resume=True)
    assert resumed["class_weight"] == first["class_weight"]
    assert resumed["final"]["rounds_completed"] == 2
