"""Packed Paillier through privagg_mod + SecureAggregation over an in-process Grid, a key-holder node included.

Claims (:mod:`fl.runners.flower.mod_paillier`): a Paillier round through the mod and the workflow gives the
same model as the SecAgg+ round on the same updates (up to the quantization bound: both decode one
exact integer sum of stochastically rounded values), with and without DP; Flower's FedAvg never samples
the key holder (Message API and legacy DefaultWorkflow); the key holder's ClientApp never runs; the
server side only ever holds the public key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fl.runners.flower.keyholder import keygen, read_public_key
from fl.runners.flower.mod import RECORD, flatten, privagg_mod
from fl.runners.flower.policy import NodePolicy
from fl.runners.flower.state import make_state_key
from fl.runners.flower.workflow import SecureAggregation
from tests.fl.flower._loopback import LoopbackGrid
from tests.fl.flower.test_secure_aggregation import _examples, _initial, _plain_mean, _train, _update

KH = 900
CLIENTS = (101, 102, 103)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The key holder's pair, made by the documented command's function (2048 bits)."""
    return keygen(tmp_path_factory.mktemp("kh"), bits=2048)


def _app(trained: list[int] | None = None) -> ClientApp:
    """The user's ClientApp with privagg_mod; ``trained`` records each node that ran its train function."""
    app = ClientApp(mods=[privagg_mod])

    @app.train()
    def _fit(msg: Message, context: Context) -> Message:
        if trained is not None:
            trained.append(context.node_id)
        return _train(msg, context)

    return app


def client_policy(tmp: Path, public: Path) -> Path:
    fp = read_public_key(public).fingerprint.hex()
    return NodePolicy(protocols=("secagg", "secagg+", "paillier"), paillier_key_fingerprint=fp).save(
        tmp / "client-policy.json")


def add_key_holder(grid: LoopbackGrid, tmp: Path, key: Path, **policy: Any) -> Context:
    """A SuperNode running the same ClientApp whose own node config makes it the key holder."""
    config: dict[str, Any] = {"role": "key-holder", "paillier-key-file": str(key),
                              "state-key-file": str(make_state_key(tmp / "kh-state.key")),
                              "policy-file": str(NodePolicy(**policy).save(tmp / "kh-policy.json"))}
    ctx = Context(run_id=grid.run_id, node_id=KH, node_config=config, state=RecordDict(), run_config={})
    grid.contexts[KH] = ctx
    return ctx


def paillier_grid(tmp: Path, keys: tuple[Path, Path], trained: list[int] | None = None,
                  **holder_policy: Any) -> LoopbackGrid:
    grid = LoopbackGrid(_app(trained), 3, tmp, node_config={"policy-file": str(client_policy(tmp, keys[1]))})
    add_key_holder(grid, tmp, keys[0], **holder_policy)
    return grid


def secagg_grid(tmp: Path, keys: tuple[Path, Path]) -> LoopbackGrid:
    """The same three clients (same policy), no key holder: the SecAgg+ reference."""
    return LoopbackGrid(_app(), 3, tmp, node_config={"policy-file": str(client_policy(tmp, keys[1]))})


def _quantum(sa: SecureAggregation, size: int) -> float:
    """The quantization scale of the (SecAgg+) round without DP: one step is ``1 / scale``."""
    bound = sa.terms.with_cohort(3).pipeline(size)
    return float(bound.pipeline.layers[0].quantizer(bound.specs[0]).scale)  # type: ignore[attr-defined]


def test_paillier_through_mod_and_workflow_equals_the_secagg_plus_round(tmp_path: Path, keys: tuple[Path, Path],
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """FedAvg, 2 rounds, 3 clients + the key holder: the Paillier model equals the SecAgg+ model (and plain
    FedAvg) within the quantization bound; FedAvg sampled every node it was offered, never the key holder."""
    trained: list[int] = []
    grid = paillier_grid(tmp_path / "p", keys, trained)
    sa = SecureAggregation(protocol="paillier", threshold=0.7, poll_interval=0.0, paillier_public_key=keys[1])
    result = FedAvg(fraction_evaluate=0.0).start(grid=sa.wrap(grid), initial_arrays=_initial(), num_rounds=2)
    ref_grid = secagg_grid(tmp_path / "s", keys)
    ref = SecureAggregation(protocol="secagg+", threshold=0.7, poll_interval=0.0)
    ref_result = FedAvg(fraction_evaluate=0.0).start(grid=ref.wrap(ref_grid), initial_arrays=_initial(), num_rounds=2)
    glob = flatten(_initial()).astype(np.float32).astype(np.float64)
    step = 1 / _quantum(ref, glob.size)
    w = sum(min(_examples(n), 1000) / 1000 for n in CLIENTS)
    for rnd in (1, 2):
        mean = _plain_mean(list(CLIENTS), rnd, glob)
        tol = 3 * step / w * (1 + np.abs(mean).max())  # < 1 step per summand, divided by the total weight
        np.testing.assert_allclose(sa.history[rnd - 1].mean_update, mean, atol=tol, rtol=0)
        np.testing.assert_allclose(sa.history[rnd - 1].mean_update, ref.history[rnd - 1].mean_update,
                                   atol=2 * tol, rtol=0)
        glob = (glob + sa.history[rnd - 1].mean_update).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(flatten(result.arrays), flatten(ref_result.arrays), atol=1e-5)
    assert [h.included for h in sa.history] == [CLIENTS] * 2 and sorted(trained) == sorted(CLIENTS * 2)
    assert "sampled the key-holder node" not in caplog.text  # FedAvg was never offered it
    assert sa.history[0].weight == pytest.approx(sum(_examples(n) for n in CLIENTS), rel=1e-9)
    to_holder = [m.content[RECORD]["stage"] for m in grid.sent if m.metadata.dst_node_id == KH]
    assert to_holder == ["hello", "decrypt", "decrypt"], "the key holder got its hello once and one request a round"
    assert not any(m.content.array_records for m in grid.sent if m.metadata.dst_node_id == KH)
    assert sa.key_holders is not None and sa.key_holders.holder is not None and sa.key_holders.holder.node == KH
    fingerprint = sa.ledger.as_list()[0]["guarantees"][-1]["params"]["key_fingerprint"]
    assert fingerprint == read_public_key(keys[1]).fingerprint.hex()


def test_the_strategy_never_sees_the_key_holder(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """get_node_ids of the wrapped grid offers only the nodes whose own hello said 'client'; a node without
    privagg_mod (its hello fails) is never offered either."""
    grid = paillier_grid(tmp_path, keys)
    sa = SecureAggregation(protocol="paillier", poll_interval=0.0)
    assert sorted(grid.get_node_ids()) == [*CLIENTS, KH]
    assert list(sa.wrap(grid).get_node_ids()) == list(CLIENTS)
    assert sa.key_holders is not None and sa.key_holders.roles == {101: "client", 102: "client", 103: "client",
                                                                  KH: "key-holder"}
    hellos = len(grid.sent)
    assert list(sa.wrap(grid).get_node_ids()) == list(CLIENTS) and len(grid.sent) == hellos  # asked once
    secagg = SecureAggregation(protocol="secagg+")
    assert sorted(secagg.wrap(grid).get_node_ids()) == [*CLIENTS, KH]  # other protocols: unchanged


def test_no_key_holder_or_two_key_holders_is_a_clear_error(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    grid = LoopbackGrid(_app(), 3, tmp_path, node_config={"policy-file": str(client_policy(tmp_path, keys[1]))})
    sa = SecureAggregation(protocol="paillier", poll_interval=0.0)
    msgs = FedAvg().configure_train(1, _initial(), ConfigRecord(), sa.wrap(grid))
    assert sa.wrap(grid).send_and_receive(msgs) == [] and sa.history == []  # logged: no key holder answered
    with pytest.raises(Exception, match="no key-holder SuperNode answered"):
        sa.aggregate(grid, list(msgs), round=5)
    add_key_holder(grid, tmp_path, keys[0])
    second = grid.contexts[KH]
    grid.contexts[KH + 1] = Context(run_id=7, node_id=KH + 1, node_config=dict(second.node_config),
                                    state=RecordDict(), run_config={})
    with pytest.raises(RuntimeError, match="exactly one key-holder SuperNode"):
        SecureAggregation(protocol="paillier", poll_interval=0.0).wrap(grid).get_node_ids()


def test_a_key_holder_with_another_key_than_the_operators_is_refused(tmp_path: Path,
                                                                      keys: tuple[Path, Path]) -> None:
    other = keygen(tmp_path / "other", bits=2048)
    grid = paillier_grid(tmp_path, keys)
    sa = SecureAggregation(protocol="paillier", poll_interval=0.0, paillier_public_key=other[1].read_text())
    with pytest.raises(RuntimeError, match=r"not the key \w+ this server was given"):
        sa.wrap(grid).get_node_ids()


def test_paillier_with_central_dp_equals_secagg_plus_and_is_accounted(tmp_path: Path,
                                                                       keys: tuple[Path, Path]) -> None:
    """Clip only: the Paillier mean equals the SecAgg+ mean within quantization. Clip + central noise: the
    noise is there (residual std as stated) and the round is accounted exactly as SecAgg+'s."""
    grid = paillier_grid(tmp_path / "p", keys)
    ref_grid = secagg_grid(tmp_path / "s", keys)
    means = []
    for protocol, g in (("paillier", grid), ("secagg+", ref_grid)):
        sa = SecureAggregation(protocol=protocol, threshold=0.7, clip=1.0, poll_interval=0.0)
        sa.wrap(g).send_and_receive(FedAvg().configure_train(1, _initial(), ConfigRecord(), sa.wrap(g)))
        means.append(sa.history[0].mean_update)
    glob = flatten(_initial()).astype(np.float64)
    clipped = [u * min(1.0, 1.0 / np.linalg.norm(u)) for u in (_update(n, 1, glob.size) for n in CLIENTS)]
    np.testing.assert_allclose(means[0], np.mean(clipped, axis=0), atol=1e-6)
    np.testing.assert_allclose(means[0], means[1], atol=1e-6)
    eps = []
    for protocol, g in (("paillier", grid), ("secagg+", ref_grid)):
        sa = SecureAggregation(protocol=protocol, threshold=0.7, clip=1.0, noise_multiplier=2.0, delta=1e-5,
                               poll_interval=0.0)
        sa.aggregate(g, list(FedAvg().configure_train(2, _initial(), ConfigRecord(), sa.wrap(g))), round=2)
        clipped = [u * min(1.0, 1.0 / np.linalg.norm(u)) for u in (_update(n, 2, glob.size) for n in CLIENTS)]
        resid = sa.history[0].mean_update - np.mean(clipped, axis=0)
        assert 0.3 < float(np.std(resid)) < 1.3, protocol  # expected 2/3 over 16 coordinates
        eps.append(sa.report()["privacy"]["epsilon"])
    assert eps[0] == pytest.approx(eps[1], rel=1e-9) and np.isfinite(eps[0])


def test_legacy_default_workflow_never_samples_the_key_holder(tmp_path: Path, keys: tuple[Path, Path],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """DefaultWorkflow(fit_workflow=SecureAggregation(protocol='paillier')) on the RAW grid: the key holder is
    unregistered from the client manager before the strategy samples, and the sum is the plain weighted mean."""
    from flwr.client import NumPyClient
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow

    init = [a.astype(np.float64) for a in _initial().to_numpy_ndarrays()]
    fitted: list[int] = []

    class Client(NumPyClient):
        def __init__(self, nid: int) -> None:
            self.nid = nid

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, Any]:
            fitted.append(self.nid)
            flat = np.concatenate([p.ravel() for p in parameters]) + _update(self.nid, 1, 16)
            return [flat[:12].reshape(3, 4), flat[12:]], _examples(self.nid), {}

    app = ClientApp(client_fn=lambda context: Client(context.node_id).to_client(), mods=[privagg_mod])
    grid = LoopbackGrid(app, 3, tmp_path, node_config={"policy-file": str(client_policy(tmp_path, keys[1]))})
    add_key_holder(grid, tmp_path, keys[0])
    sa = SecureAggregation(protocol="paillier", threshold=0.7, poll_interval=0.0)
    strategy = LegacyFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_available_clients=3,
                            initial_parameters=ndarrays_to_parameters(init))
    ctx = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(context=ctx, config=ServerConfig(num_rounds=1), strategy=strategy)
    DefaultWorkflow(fit_workflow=sa)(grid, legacy)
    assert sa.history[0].included == CLIENTS and sorted(fitted) == list(CLIENTS)
    assert "sampled the key-holder node" not in caplog.text
    assert KH not in {p.node_id for p in legacy.client_manager.all().values()}
    glob = np.concatenate([a.ravel() for a in init])
    np.testing.assert_allclose(sa.history[0].mean_update, _plain_mean(list(CLIENTS), 1, glob, np.float64),
                               atol=1e-6)


def test_a_key_holder_without_a_usable_key_file_is_named(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """A key-holder node whose key file others can read refuses its hello; the round's error names why."""
    import shutil

    loose = tmp_path / "loose" / "key.json"
    loose.parent.mkdir()
    shutil.copy(keys[0], loose)
    loose.chmod(0o644)
    grid = LoopbackGrid(_app(), 3, tmp_path, node_config={"policy-file": str(client_policy(tmp_path, keys[1]))})
    add_key_holder(grid, tmp_path, loose)
    sa = SecureAggregation(protocol="paillier", poll_interval=0.0)
    assert list(sa.wrap(grid).get_node_ids()) == list(CLIENTS)
    with pytest.raises(Exception, match=r"readable by others .*chmod 600"):
        sa.aggregate(grid, list(FedAvg().configure_train(1, _initial(), ConfigRecord(), sa.wrap(grid))))


def test_a_round_below_the_key_holders_floor_is_refused_before_anyone_trains(tmp_path: Path,
                                                                             keys: tuple[Path, Path]) -> None:
    """The key holder's hello names its min_summands (4 here): a round of 3 is not started, so no client
    trains or releases a ciphertext for a sum that would never be decrypted; the round number is not spent."""
    trained: list[int] = []
    grid = paillier_grid(tmp_path, keys, trained, min_summands=4)
    sa = SecureAggregation(protocol="paillier", poll_interval=0.0)
    msgs = list(FedAvg().configure_train(1, _initial(), ConfigRecord(), sa.wrap(grid)))
    with pytest.raises(Exception, match="at least 4 clients; the strategy sampled 3"):
        sa.aggregate(grid, msgs)
    assert trained == [] and sa.rounds == 0


def test_paillier_with_distributed_noise_is_accounted_as_secagg_plus(tmp_path: Path,
                                                                       keys: tuple[Path, Path]) -> None:
    """placement='clients': each client adds its share of the noise before encrypting; the decoded mean
    carries z*S/3 per coordinate, and the round is accounted with the same survivor floor (3 of 3) as SecAgg+."""
    glob = flatten(_initial()).astype(np.float64)
    clipped = np.mean([u * min(1.0, 1.0 / np.linalg.norm(u)) for u in (_update(n, 1, glob.size) for n in CLIENTS)],
                      axis=0)
    reports = []
    grids = (("paillier", paillier_grid(tmp_path / "p", keys)), ("secagg+", secagg_grid(tmp_path / "s", keys)))
    for protocol, grid in grids:
        sa = SecureAggregation(protocol=protocol, threshold=0.7, clip=1.0, noise_multiplier=2.0,
                               placement="clients", poll_interval=0.0)
        sa.wrap(grid).send_and_receive(FedAvg().configure_train(1, _initial(), ConfigRecord(), sa.wrap(grid)))
        assert sa.history[0].included == CLIENTS, protocol
        assert 0.3 < float(np.std(sa.history[0].mean_update - clipped)) < 1.3, protocol  # expected 2/3
        reports.append({o["observer"]: o["epsilon"] for o in sa.report()["privacy"]["observers"]})
    assert reports[0].keys() == {"released model", "server"}
    assert reports[0] == pytest.approx(reports[1], rel=1e-9)
