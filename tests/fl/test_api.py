"""fl.train: a user's own module and sites in, the trained module out; every bad input refused before round 1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fl.api as api
from fl.data.stats import DataError
from fl.layers import Clip, GaussianNoise, Quantize
from fl.spec import CompositionError
from fl.sums.secagg import SecAggPlus


def _table(n: int = 240, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=d) > 0).astype(np.int64)
    return x, y


def _sites(x: np.ndarray, y: np.ndarray, k: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {f"h{i}": (x[p], y[p]) for i, p in enumerate(np.array_split(np.arange(len(y)), k))}


def _net(d: int = 6, c: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, c))


@pytest.fixture
def no_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad input must be refused before any round starts: a round starting fails the test."""

    def refuse(self: Any, r: int) -> None:
        raise AssertionError("a round started before the bad input was refused")

    monkeypatch.setattr(api._ApiFederation, "run_round", refuse)


def test_train_returns_the_trained_module_report_and_ledger() -> None:
    x, y = _table(300)
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    result = api.train(model=net, sites=_sites(x[:240], y[:240]), rounds=8,
                       optimizer=lambda p: torch.optim.SGD(p, lr=0.5), loss=nn.CrossEntropyLoss(),
                       evaluation=(x[240:], y[240:]), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True)), "the prototype was trained"
    assert isinstance(result.model, nn.Sequential) and result.model is not net
    with torch.no_grad():
        acc = float((result.model(torch.from_numpy(x[240:])).argmax(1).numpy() == y[240:]).mean())
    assert acc == pytest.approx(result.report["final"]["accuracy"], abs=1e-6)
    assert acc > 0.8
    assert result.report["sites"] == {"0": "h0", "1": "h1", "2": "h2"}
    assert [e["round"] for e in result.ledger.entries] == list(range(1, 9))
    assert result.epsilon is None


def test_privacy_objects_translate_to_the_cli_configuration() -> None:
    objects = api.privacy_config([Clip(l2=2.0), GaussianNoise(multiplier=1.3), SecAggPlus(threshold=3)],
                                 epsilon=None, delta=1e-5)
    words = api.privacy_config("clip,noise,secagg+", epsilon=None, delta=1e-5,
                               options={"clip": 2.0, "noise_multiplier": 1.3, "threshold": 3})
    assert objects == words
    dist = api.privacy_config([Clip(l2=1.0), GaussianNoise(multiplier=1.0, placement="clients"), Quantize(bits=16)],
                              epsilon=None, delta=1e-5)
    assert dist.tokens() == ("clip", "dnoise", "quantize") and dist.quant_bits == 16


def test_privacy_objects_that_cannot_be_expressed_are_refused() -> None:
    with pytest.raises(CompositionError, match=r"discrete=True"):
        api.privacy_config([Clip(l2=1.0), GaussianNoise(multiplier=1.0, discrete=True)], epsilon=None, delta=1e-5)
    with pytest.raises(CompositionError, match=r"'noise'"):
        api.privacy_config([Clip(l2=1.0), GaussianNoise(multiplier=1.0)], epsilon=1.0, delta=1e-5)
    with pytest.raises(CompositionError, match="set twice"):
        api.privacy_config([Clip(l2=1.0), "noise"], epsilon=1.0, delta=1e-5, options={"clip": 2.0})
    with pytest.raises(CompositionError, match=r"not one fl\.train knows"):
        api.privacy_config([object()], epsilon=None, delta=1e-5)


def test_dp_fedavg_objects_calibrate_to_epsilon_and_report_it() -> None:
    x, y = _table()
    result = api.train(model=_net(), sites=_sites(x, y, 4), rounds=3, privacy=[Clip(l2=1.0), "noise", SecAggPlus()],
                       epsilon=2.0, delta=1e-5, evaluation=(x, y))
    assert result.report["pipeline"].startswith("clip(l2=1),gaussian-noise")
    assert result.report["pipeline"].endswith("secagg+")
    assert 1.9 < result.epsilon <= 2.0 + 1e-9
    assert result.delta == 1e-5


def test_dp_sgd_with_a_user_loss_and_optimizer_reports_epsilon() -> None:
    x, y = _table()
    seen: list[int] = []

    def factory(params: Any) -> torch.optim.Optimizer:
        seen.append(1)
        return torch.optim.Adam(params, lr=0.01)

    result = api.train(model=_net(), sites=_sites(x, y), rounds=2, optimizer=factory, loss=nn.CrossEntropyLoss(),
                       privacy=[api.DPSGD(clip=1.0, batch_size=16)], epsilon=3.0, evaluation=(x, y))
    assert result.epsilon is not None and result.epsilon <= 3.0 + 1e-9
    assert len(seen) >= 2 * 3  # a fresh optimizer per site per round (plus the up-front check)


def test_without_a_loss_dp_sgd_keeps_its_closed_form_cross_entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    from fl.training.dp_sgd import DpSgdTrainer

    seen: list[Any] = []
    monkeypatch.setattr(api, "_run", lambda fed, rounds, progress: seen.append(fed.trainer))
    x, y = _table()
    api.train(model=nn.Sequential(nn.Linear(6, 2)), sites=_sites(x, y), privacy="dp-sgd", epsilon=1.0)
    api.train(model=_net(), sites=_sites(x, y), privacy="dp-sgd", epsilon=1.0, loss=nn.CrossEntropyLoss())
    plain, custom = seen
    assert isinstance(plain, DpSgdTrainer) and plain.loss is None  # dp.sgd's own loss: the one-Linear fast path
    assert isinstance(custom, DpSgdTrainer) and custom.loss is not None
    assert custom.loss(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)).shape == (3,)  # reduction='none'


@pytest.mark.slow
def test_a_cnn_goes_through_opacus_under_dp_sgd() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[:300, None] / 16.0).astype(np.float32)
    y = digits.target[:300].astype(np.int64)
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    result = api.train(model=cnn, sites=_sites(x, y, 2), rounds=1, privacy="dp-sgd", epsilon=5.0,
                       evaluation=(x, y), privacy_options={"dpsgd_batch_size": 32})
    assert isinstance(result.model[0], nn.Conv2d)
    assert result.epsilon is not None and result.epsilon <= 5.0 + 1e-9
    assert not torch.equal(result.model[0].weight, cnn[0].weight)


def test_torch_dataset_dataloader_and_dataframe_sites_train_alike() -> None:
    x, y = _table(180)
    a, b, c = np.array_split(np.arange(180), 3)
    df = pd.DataFrame(x[c], columns=[f"f{i}" for i in range(6)])
    sites = {"ds": TensorDataset(torch.from_numpy(x[a]), torch.from_numpy(y[a])),
             "dl": DataLoader(TensorDataset(torch.from_numpy(x[b]), torch.from_numpy(y[b])), batch_size=7),
             "df": (df, pd.Series(y[c]))}
    data = api._array_dataset(sites, (x, y), _net(), single_class_ok=False)
    np.testing.assert_array_equal(data.x_train, x)
    np.testing.assert_array_equal(data.y_train, y)
    assert data.site_names == ("ds", "dl", "df")
    result = api.train(model=_net(), sites=sites, rounds=1, evaluation=(x, y))
    assert result.report["final"]["rounds_completed"] == 1


def test_embedding_models_keep_integer_token_ids() -> None:
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 20, size=(120, 5))
    labels = (tokens[:, 0] < 10).astype(np.int64)

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(t).mean(1))

    def accuracy(m: nn.Module) -> dict[str, float]:
        return {"acc": float((m(torch.from_numpy(tokens)).argmax(1).numpy() == labels).mean())}

    result = api.train(model=Bag(), sites=_sites(tokens, labels, 2), rounds=2, evaluation=accuracy)
    assert 0.0 <= result.report["final"]["acc"] <= 1.0
    assert "acc" in result.report["rounds"][-1]


def test_csv_sites_use_the_federated_preprocessing(tmp_path: Path) -> None:
    x, y = _table(200, d=3)
    paths = {}
    for name, (xs, ys) in _sites(x, y, 2).items():
        frame = pd.DataFrame(xs * 10 + 5, columns=["a", "b", "c"]).assign(label=np.where(ys == 1, "yes", "no"))
        paths[name] = tmp_path / f"{name}.csv"
        frame.to_csv(paths[name], index=False)
    result = api.train(model=_net(d=3), sites=paths, target="label", rounds=2)
    assert result.report["sites"] == {"0": "h0", "1": "h1"}
    assert api._named_sites(list(paths.values())) == paths  # a list of CSVs: the file stems name the sites
    assert result.ledger.entries[0]["stage"] == "preprocessing"
    assert "accuracy" in result.report["final"]


# ---- bad input: each a clear error naming the fix, before any round -------------------------------
@pytest.mark.usefixtures("no_rounds")
class TestBadInput:
    x, y = _table()

    def test_model_output_width_must_match_the_classes(self) -> None:
        with pytest.raises(DataError, match=r"outputs 3 class score.*nn\.Linear\(\.\.\., 2\)"):
            api.train(model=_net(c=3), sites=_sites(self.x, self.y))

    def test_a_model_that_cannot_take_the_features(self) -> None:
        with pytest.raises(TypeError, match="cannot run on a batch"):
            api.train(model=_net(d=7), sites=_sites(self.x, self.y))

    def test_a_site_with_no_rows(self) -> None:
        sites = {**_sites(self.x, self.y), "empty": (self.x[:0], self.y[:0])}
        with pytest.raises(DataError, match=r"site 'empty' has no rows"):
            api.train(model=_net(), sites=sites)

    def test_a_site_with_a_single_class(self) -> None:
        one = self.y == 1
        sites = {"mixed": (self.x, self.y), "ones": (self.x[one], self.y[one])}
        with pytest.raises(DataError, match=r"site 'ones' holds a single class.*allow_single_class_sites=True"):
            api.train(model=_net(), sites=sites)

    def test_columns_that_differ_across_sites_are_named(self) -> None:
        a = pd.DataFrame(self.x[:100], columns=list("abcdef"))
        b = pd.DataFrame(self.x[100:], columns=list("abcdeg"))
        sites = {"a": (a, self.y[:100]), "b": (b, self.y[100:])}
        pattern = r"columns differ across sites: site 'b' vs 'a': missing \['f'\]; extra \['g'\]"
        with pytest.raises(DataError, match=pattern):
            api.train(model=_net(), sites=sites)

    def test_csv_columns_that_differ_are_named(self, tmp_path: Path) -> None:
        pd.DataFrame({"a": [1, 2], "b": [3, 4], "t": [0, 1]}).to_csv(tmp_path / "p.csv", index=False)
        pd.DataFrame({"a": [1, 2], "c": [3, 4], "t": [0, 1]}).to_csv(tmp_path / "q.csv", index=False)
        with pytest.raises(DataError, match=r"'b' missing at q.*'c' missing at p"):
            api.train(model=_net(d=2), sites={"p": tmp_path / "p.csv", "q": tmp_path / "q.csv"}, target="t")

    def test_nan_features(self) -> None:
        x = self.x.copy()
        x[5, 2] = np.nan
        with pytest.raises(DataError, match=r"site 'h0' has NaN/Inf features in 1 row\(s\) \(first: \[5\]\)"):
            api.train(model=_net(), sites=_sites(x, self.y))

    def test_an_optimizer_instance_instead_of_a_factory(self) -> None:
        net = _net()
        with pytest.raises(TypeError, match=r"optimizer=lambda params: torch\.optim\.SGD\(params"):
            api.train(model=net, sites=_sites(self.x, self.y), optimizer=torch.optim.SGD(net.parameters(), lr=0.1))

    def test_a_factory_that_returns_no_optimizer(self) -> None:
        with pytest.raises(TypeError, match=r"not a torch\.optim\.Optimizer"):
            api.train(model=_net(), sites=_sites(self.x, self.y), optimizer=lambda p: 0.1)

    def test_a_loss_that_is_not_callable(self) -> None:
        with pytest.raises(TypeError, match=r"loss= must be callable.*CrossEntropyLoss\(\)"):
            api.train(model=_net(), sites=_sites(self.x, self.y), loss="cross_entropy")
        with pytest.raises(TypeError, match=r"pass an instance: loss=CrossEntropyLoss\(\)"):
            api.train(model=_net(), sites=_sites(self.x, self.y), loss=nn.CrossEntropyLoss)

    def test_dp_sgd_needs_a_per_example_loss(self) -> None:
        with pytest.raises(TypeError, match="one value per example"):
            api.train(model=_net(), sites=_sites(self.x, self.y), privacy="dp-sgd", epsilon=1.0,
                      loss=lambda out, y: nn.functional.cross_entropy(out, y))

    def test_labels_that_are_not_class_indices(self) -> None:
        labels = np.where(self.y == 1, "yes", "no")
        with pytest.raises(DataError, match=r"np\.unique"):
            api.train(model=_net(), sites={"a": (self.x, labels)})
