"""The centralized baseline is the same model family: the same CNN / LayerNorm MLP for torch-only families."""

from __future__ import annotations

from typing import Any

import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from torch import nn

import fl.training.loop as loop
from fl.config import TrainConfig
from fl.report import summary_lines
from fl.training import trainers
from fl.training.loop import Federation, baseline_model, centralized_baseline, train


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, nn.Module]]:
    built: list[tuple[str, nn.Module]] = []
    real = loop.build_model

    def counting(kind: str, *args: Any, **kwargs: Any) -> nn.Module:
        model = real(kind, *args, **kwargs)
        built.append((kind, model))
        return model

    monkeypatch.setattr(loop, "build_model", counting)
    return built


def _no_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Any, *args: Any) -> Any:
        raise AssertionError(f"the baseline fitted a scikit-learn {type(self).__name__}")

    monkeypatch.setattr(MLPClassifier, "fit", refuse)
    monkeypatch.setattr(LogisticRegression, "fit", refuse)


@pytest.mark.parametrize(("model", "layer"), [("cnn", nn.Conv2d), ("mlp-ln", nn.LayerNorm)])
def test_torch_families_are_their_own_baseline(monkeypatch: pytest.MonkeyPatch, model: str, layer: type) -> None:
    config = TrainConfig(dataset="digits", model=model, hidden=16, clients=2, rounds=2, seed=3)
    data = Federation(config).data
    built = _count_builds(monkeypatch)
    _no_sklearn(monkeypatch)
    first = centralized_baseline(data, config)
    assert [kind for kind, _ in built] == [model]  # one model, of the run's own family
    assert any(isinstance(m, layer) for m in built[0][1].modules())
    assert 0.3 < first <= 1.0  # 2 epochs over 1437 digits rows learns well beyond the 10% floor
    assert centralized_baseline(data, config) == first  # seeded: the same number every time


def test_the_epochs_budget_is_rounds_times_local_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    class Spy(trainers.PlainTrainer):
        def train(self, *args: Any, **kwargs: Any) -> Any:
            seen.append(self.epochs)
            assert (self.optimizer, self.lr, self.batch_size) == ("adam", loop.CENTRAL_ADAM_LR, 16)
            return super().train(*args, **kwargs)

    monkeypatch.setattr(trainers, "PlainTrainer", Spy)
    config = TrainConfig(dataset="digits", model="mlp-ln", hidden=8, clients=2, rounds=3, local_epochs=2,
                         lr=1.0, batch_size=16)  # lr 1.0 is the federation's, not the baseline's
    centralized_baseline(Federation(config).data, config)
    assert seen == [6]  # 3 rounds x 2 local epochs


def test_the_summary_names_the_baseline_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_sklearn(monkeypatch)
    report = train(TrainConfig(dataset="digits", model="cnn", hidden=8, clients=2, rounds=1, seed=0))
    assert report["baseline"]["centralized_model"] == "same CNN, no privacy"
    line = next(x for x in summary_lines(report) if x.startswith("baselines:"))
    assert f"centralized (same CNN, no privacy) {report['baseline']['centralized_accuracy']:.4f}" in line


def test_logreg_keeps_scikit_learns_logistic_regression(monkeypatch: pytest.MonkeyPatch) -> None:
    fits: list[str] = []
    real = LogisticRegression.fit

    def counting(self: Any, *args: Any) -> Any:
        fits.append(type(self).__name__)
        return real(self, *args)

    monkeypatch.setattr(LogisticRegression, "fit", counting)
    config = TrainConfig(model="logreg", rounds=1, clients=2)
    assert centralized_baseline(Federation(config).data, config) > 0.9
    assert fits == ["LogisticRegression"]
    assert baseline_model(config) == "scikit-learn logistic regression, no privacy"
    assert baseline_model(TrainConfig(model="mlp", hidden=8)) == "scikit-learn MLP (8, 8), no privacy"
