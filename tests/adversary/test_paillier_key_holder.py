"""Adversary: a malicious ServerApp against the Paillier key-holder node and the clients (real ClientApp).

The server controls the job and every message. Claims (:mod:`fl.runners.flower.keyholder`; for users' own
apps :mod:`fl.runners.flower.mod_paillier`): the key holder decrypts no aggregate that claims fewer than
ITS policy's ``min_summands`` clients (so not one client's ciphertext), at most one aggregate per
(planned) round, only under its own key, and never trains; a client encrypts only to the key its own
policy pins. The stated limit is tested too: a forged summand
count (one client's ciphertext times encryptions of zero) is NOT detected without authenticated clients.
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

from fl.runners.flower import FlowerJob, NodePolicy
from fl.runners.flower.job import sum_protocol, sum_value
from fl.runners.flower.keyholder import keygen, read_public_key
from fl.runners.flower.mod import RECORD, SecureTerms, privagg_mod
from fl.runners.flower.mod_paillier import KeyHolder
from fl.runners.flower.workflow import SecureAggregation
from secagg import wire
from secagg.machine import KEY_HOLDER, SERVER
from secagg.paillier import PaillierAggregate, PaillierDecrypted, PaillierInput, add_batches, generate_keypair
from tests.adversary.flower_harness import deliver, instruction, key_holder_context, node_context, server_identity
from tests.fl.flower.test_mod_paillier import paillier_grid
from tests.fl.flower.test_secure_aggregation import _initial, _train

KH = 900
SESSION = b"s" * 16


@pytest.fixture(autouse=True)
def _as_server(monkeypatch: pytest.MonkeyPatch) -> None:
    server_identity(monkeypatch)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return keygen(tmp_path_factory.mktemp("kh"), bits=1024)


def _job(tmp: Path, public_json: str) -> FlowerJob:
    return FlowerJob(task="sum", out=str(tmp / "out"), clients=3, size=40, rounds=2, protocol="paillier",
                     threshold=0.6, paillier_public_key=public_json)


def _policy(tmp: Path, keys: tuple[Path, Path], **kw: Any) -> Path:
    fp = read_public_key(keys[1]).fingerprint.hex()
    return NodePolicy(protocols=("paillier",), paillier_key_fingerprint=fp, **kw).save(tmp / "policy.json")


def _batch(job: FlowerJob, cid: int, rnd: int = 1, *, zeros: bool = False) -> Any:
    """Client ``cid``'s honest ciphertext batch (or an encryption of zeros anyone can make)."""
    ssum, spec = sum_protocol(job)
    value = np.zeros(job.size, dtype=np.uint64) if zeros else sum_value(job, rnd, cid)
    return ssum.client(cid, value, spec=spec, session=SESSION, round=rnd).start()[0].batch


def _ask(ctx: Any, batch: Any, included: tuple[int, ...], rnd: int = 1) -> Any:
    agg = PaillierAggregate(SERVER, KEY_HOLDER, SESSION, rnd, included, batch)
    fields = {"round": rnd, "session": SESSION, "final": True, "step": 1, "msgs": [wire.dumps(agg)]}
    return deliver(instruction(ctx.node_id, "query.privagg_keyholder", fields), ctx)


def _total(reply: Any) -> Any:
    assert not reply.has_error(), reply.error.reason
    (msg,) = [wire.loads(b) for b in reply.content["privagg"]["msgs"]]
    assert isinstance(msg, PaillierDecrypted) and msg.sender == KEY_HOLDER
    return msg.total


def _holder(tmp: Path, keys: tuple[Path, Path], job: FlowerJob, **policy: Any) -> Any:
    return key_holder_context(tmp, KH, job.to_json(), keys[0], policy=_policy(tmp, keys, **policy))


def test_one_clients_ciphertext_is_not_decrypted(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    job = _job(tmp_path, keys[1].read_text())
    ctx = _holder(tmp_path, keys, job)
    reply = _ask(ctx, _batch(job, 0), (0,))
    assert reply.has_error() and "refusing to decrypt an aggregate of 1 client" in reply.error.reason
    forged = _ask(ctx, _batch(job, 0), (0, 1))  # one ciphertext, two names
    assert forged.has_error() and "claims 1 summands but lists 2" in forged.error.reason


def test_fewer_than_the_key_holders_own_min_summands_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    job = _job(tmp_path, keys[1].read_text())  # the job's own min_clients is 2
    ctx = _holder(tmp_path, keys, job, min_summands=3)
    two = add_batches([_batch(job, 0), _batch(job, 1)], read_public_key(keys[1]))
    reply = _ask(ctx, two, (0, 1))
    assert reply.has_error() and "at least 3 are required" in reply.error.reason
    three = add_batches([_batch(job, c) for c in range(3)], read_public_key(keys[1]))
    expect = sum(sum_value(job, 1, c).astype(np.int64) for c in range(3))
    np.testing.assert_array_equal(_total(_ask(ctx, three, (0, 1, 2))), expect)  # the honest sum: decrypted


def test_one_decryption_per_planned_round(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    job = _job(tmp_path, keys[1].read_text())
    ctx = _holder(tmp_path, keys, job)
    pk = read_public_key(keys[1])
    _total(_ask(ctx, add_batches([_batch(job, 0), _batch(job, 1)], pk), (0, 1)))
    again = _ask(ctx, add_batches([_batch(job, 1), _batch(job, 2)], pk), (1, 2))  # a second subset, same round
    assert again.has_error() and "already decrypted the sum of round 1" in again.error.reason
    late = _ask(ctx, add_batches([_batch(job, 0, 3), _batch(job, 1, 3)], pk), (0, 1), rnd=3)
    assert late.has_error() and "outside the job's planned rounds 1..2" in late.error.reason


def test_a_ciphertext_under_another_key_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    own = _job(tmp_path, keys[1].read_text())
    other_public, _ = generate_keypair(bits=1024)
    ctx = _holder(tmp_path, keys, own)
    other = _job(tmp_path, other_public.to_json())
    reply = _ask(ctx, add_batches([_batch(other, 0), _batch(other, 1)], other_public), (0, 1))
    assert reply.has_error() and "KeyMismatchError" in reply.error.reason


def test_a_job_naming_another_key_is_refused_by_key_holder_and_clients(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    server_public, _ = generate_keypair(bits=1024)  # a key pair the server holds itself
    job = _job(tmp_path, server_public.to_json())
    holder = _holder(tmp_path, keys, job)
    hello = deliver(instruction(KH, "query.privagg_hello", {"hello": 1}), holder)
    assert hello.has_error() and "not this key holder's own key" in hello.error.reason
    pinned = node_context(tmp_path, 100, 0, 3, job.to_json(), policy=_policy(tmp_path, keys))
    unpinned = node_context(tmp_path, 101, 1, 3, job.to_json(),
                            policy=NodePolicy(protocols=("paillier",)).save(tmp_path / "open.json"))
    start = {"round": 1, "session": SESSION}
    for ctx, why in ((pinned, "is not the key holder's key"), (unpinned, "pins no Paillier key")):
        for kind, fields in (("query.privagg_hello", {"hello": 1}), ("train.privagg_start", start)):
            reply = deliver(instruction(ctx.node_id, kind, fields), ctx)
            assert reply.has_error() and why in reply.error.reason, (kind, why)


def test_the_key_holder_never_trains_and_a_client_never_decrypts(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    job = _job(tmp_path, keys[1].read_text())
    holder = _holder(tmp_path, keys, job)
    for kind in ("train.privagg_start", "query.privagg_step"):
        reply = deliver(instruction(KH, kind, {"round": 1, "session": SESSION, "step": 1, "final": True}), holder)
        assert reply.has_error() and "answers only" in reply.error.reason
    client = node_context(tmp_path, 100, 0, 3, job.to_json(), policy=_policy(tmp_path, keys))
    reply = _ask(client, _batch(job, 0), (0,))
    assert reply.has_error() and "not the key holder" in reply.error.reason


def test_stated_limit_a_forged_summand_count_is_not_detected(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """The documented limit (honest-but-curious aggregator for this bound): one client's ciphertext times an
    encryption of zeros the server made itself passes as a 2-client sum and reveals that client's update.
    Stopping it needs authenticated (signed) client ciphertexts; if this ever fails, update the docstring."""
    job = _job(tmp_path, keys[1].read_text())
    ctx = _holder(tmp_path, keys, job)
    forged = add_batches([_batch(job, 0), _batch(job, 1, zeros=True)], read_public_key(keys[1]))
    np.testing.assert_array_equal(_total(_ask(ctx, forged, (0, 1))), sum_value(job, 1, 0).astype(np.int64))


# ------------------------------------------------------------------ privagg_mod in a user's own Flower app
# The same adversary (the server: the workflow, every message, the round's terms) against the mod path
# (:mod:`fl.runners.flower.mod_paillier`): the key holder is a SuperNode running the user's ClientApp with
# privagg_mod and role="key-holder" in its own node config; clients pin its key in their own policy.
def _mod_start(terms: Any, rnd: int, cid: int, node: int) -> Any:
    rec = ConfigRecord({**terms.to_record(), "stage": "start", "session": SESSION, "round": rnd, "cid": cid})
    msg = Message(RecordDict({"arrays": _initial(), "config": ConfigRecord(), RECORD: rec}), dst_node_id=node,
                  message_type="train", group_id=str(rnd))
    msg.metadata.__dict__["_message_id"] = f"start-{rnd}-{node}"
    return msg


def _mod_decrypt(batch: Any, included: tuple[int, ...], rnd: int) -> Any:
    agg = PaillierAggregate(SERVER, KEY_HOLDER, SESSION, rnd, included, batch)
    rec = ConfigRecord({"stage": "decrypt", "session": SESSION, "round": rnd, "msgs": wire.encode_frames([agg])})
    msg = Message(RecordDict({RECORD: rec}), dst_node_id=KH, message_type="train", group_id=str(rnd))
    msg.metadata.__dict__["_message_id"] = f"decrypt-{rnd}-{included}"
    return msg


def _mod_grid(tmp: Path, keys: tuple[Path, Path], trained: list[int], **holder_policy: Any) -> Any:
    """Clients 101-103 pinning the key holder's key, and the key holder (node ``KH``) with ``holder_policy``."""
    grid = paillier_grid(tmp, keys, trained, **holder_policy)
    assert KH in grid.contexts and grid.contexts[KH].node_config["role"] == "key-holder"
    return grid


def _ciphertexts(grid: Any, keys: tuple[Path, Path], rnd: int) -> list[Any]:
    """Each client's honest ciphertext batch of round ``rnd`` (through its mod, as the server receives it)."""
    terms = SecureTerms(protocol="paillier", threshold=0.6, cohort=3, paillier_public_key=keys[1].read_text())
    out = []
    for cid, node in enumerate((101, 102, 103)):
        reply = grid.app(_mod_start(terms, rnd, cid, node), grid.contexts[node])
        assert not reply.has_error(), reply.error.reason
        (msg,) = wire.decode_frames(reply.content[RECORD]["msgs"])
        assert isinstance(msg, PaillierInput) and msg.sender == cid
        out.append(msg.batch)
    return out


def test_mod_clients_refuse_a_key_the_server_substitutes(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """The server hands out its OWN public key as the key holder's: every client refuses before training,
    so no ciphertext under a key the server can open exists; a client that pins no key refuses too."""
    trained: list[int] = []
    grid = _mod_grid(tmp_path, keys, trained)
    sa = SecureAggregation(protocol="paillier", threshold=0.6, poll_interval=0.0)
    assert sa.key_holders is not None
    sa.key_holders.refresh(grid)
    server_public, _ = generate_keypair(bits=1024)
    sa.key_holders.holder = KeyHolder(KH, server_public, 2)  # the substitution
    with pytest.raises(Exception, match="0 of 3 nodes started"):
        sa.aggregate(grid, list(FedAvg().configure_train(1, _initial(), ConfigRecord(), sa.wrap(grid))), round=1)
    assert trained == [], "no client trained (nothing was computed from its data)"
    terms = SecureTerms(protocol="paillier", threshold=0.6, cohort=3, paillier_public_key=server_public.to_json())
    reply = grid.app(_mod_start(terms, 2, 0, 101), grid.contexts[101])
    assert reply.has_error() and "is not the key holder's key" in reply.error.reason
    grid.contexts[102].node_config["policy-file"] = str(
        NodePolicy(protocols=("paillier",)).save(tmp_path / "unpinned.json"))
    honest = SecureTerms(protocol="paillier", threshold=0.6, cohort=3, paillier_public_key=keys[1].read_text())
    reply = grid.app(_mod_start(honest, 2, 1, 102), grid.contexts[102])
    assert reply.has_error() and "pins no Paillier key" in reply.error.reason and trained == []


def test_mod_key_holder_refuses_one_clients_ciphertext_and_a_second_decryption(tmp_path: Path,
                                                                              keys: tuple[Path, Path]) -> None:
    """The server asks the key holder to decrypt a single client's ciphertext (named as 1 or as 2 clients),
    a sum below the key holder's own min_summands, or a second sum of the same round: all refused; the
    honest sum of the round decrypts to exactly the clients' total."""
    trained: list[int] = []
    grid = _mod_grid(tmp_path, keys, trained, min_summands=3)
    holder = grid.contexts[KH]
    c = _ciphertexts(grid, keys, 1)
    pk = read_public_key(keys[1])
    one = grid.app(_mod_decrypt(c[0], (0,), 1), holder)
    assert one.has_error() and "refusing to decrypt an aggregate of 1 client" in one.error.reason
    named_twice = grid.app(_mod_decrypt(c[0], (0, 1), 1), holder)
    assert named_twice.has_error() and "claims 1 summands but lists 2" in named_twice.error.reason
    two = grid.app(_mod_decrypt(add_batches(c[:2], pk), (0, 1), 1), holder)
    assert two.has_error() and "at least 3 are required" in two.error.reason
    full = grid.app(_mod_decrypt(add_batches(c, pk), (0, 1, 2), 1), holder)
    assert not full.has_error(), full.error.reason
    (total,) = wire.decode_frames(full.content[RECORD]["msgs"])
    assert isinstance(total, PaillierDecrypted) and total.sender == KEY_HOLDER and total.total.shape == (17,)
    again = grid.app(_mod_decrypt(add_batches(c, pk), (0, 1, 2), 1), holder)
    assert again.has_error() and "already decrypted the sum of round 1" in again.error.reason
    assert KH not in trained


def test_mod_key_holder_never_runs_the_clientapp(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """A train message with terms, one without our record, and an evaluate message to the key-holder node:
    each is refused by the mod; the user's ClientApp is never called there."""
    trained: list[int] = []
    grid = _mod_grid(tmp_path, keys, [])
    app = ClientApp(mods=[privagg_mod])  # the user's app with train AND evaluate functions

    @app.train()
    def _fit(msg: Message, context: Context) -> Message:
        trained.append(context.node_id)
        return _train(msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        trained.append(context.node_id)
        return Message(RecordDict(), reply_to=msg)

    grid.app = app
    holder = grid.contexts[KH]
    terms = SecureTerms(protocol="paillier", threshold=0.6, cohort=3, paillier_public_key=keys[1].read_text())
    plain = Message(RecordDict({"arrays": _initial(), "config": ConfigRecord()}), dst_node_id=KH,
                    message_type="train", group_id="1")
    plain.metadata.__dict__["_message_id"] = "plain"
    evaluate = Message(RecordDict({"arrays": _initial(), "config": ConfigRecord()}), dst_node_id=KH,
                       message_type="evaluate", group_id="1")
    evaluate.metadata.__dict__["_message_id"] = "eval"
    for msg in (_mod_start(terms, 1, 0, KH), plain, evaluate):
        reply = grid.app(msg, holder)
        assert reply.has_error() and "never runs the ClientApp" in reply.error.reason
    assert trained == []
    ok = grid.app(_mod_start(terms, 1, 0, 101), grid.contexts[101])  # the same app on a client does run
    assert not ok.has_error() and trained == [101]


def test_mod_stated_limit_old_ciphertexts_under_a_new_round_number_are_not_detected(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """The documented limit of the mod path (mod_paillier's docstring): ciphertexts carry no round binding,
    so a server that re-sends round 1's ciphertexts as round 2 with another subset gets both sums
    decrypted (their difference is c0 - c2). Stopping it needs signed, round-bound client ciphertexts; if
    this ever fails, update the docstrings and the README."""
    grid = _mod_grid(tmp_path, keys, [])
    holder, pk = grid.contexts[KH], read_public_key(keys[1])
    c = _ciphertexts(grid, keys, 1)
    first = grid.app(_mod_decrypt(add_batches(c[:2], pk), (0, 1), 1), holder)
    replayed = grid.app(_mod_decrypt(add_batches(c[1:], pk), (1, 2), 2), holder)
    assert not first.has_error() and not replayed.has_error()
def test_a_restarted_key_holder_still_decrypts_a_round_only_once(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """The server has round 1 of a training job decrypted, then the key holder restarts (a fresh Flower
    context, the same node files): a second subset of round 1's ciphertexts is still refused (its
    difference to the first sum would be client 0's update); the next round is decrypted."""
    from fl.config import PrivacyConfig, TrainConfig

    config = TrainConfig(dataset="breast_cancer", clients=3, rounds=2, model="logreg",
                         privacy=PrivacyConfig(spec="clip,noise,paillier", clip=1.0, noise_multiplier=0.5))
    train = FlowerJob(task="train", out=str(tmp_path / "out"), config=config.as_dict(),
                      paillier_public_key=keys[1].read_text())
    data = _job(tmp_path, keys[1].read_text())  # ciphertexts under the key holder's key
    pk = read_public_key(keys[1])
    first = _holder(tmp_path, keys, train)
    _total(_ask(first, add_batches([_batch(data, c) for c in (0, 1, 2)], pk), (0, 1, 2)))
    restarted = _holder(tmp_path, keys, train)  # same state key file, empty state: a new SuperNode process
    assert "privagg-keyholder" not in restarted.state
    again = _ask(restarted, add_batches([_batch(data, c) for c in (1, 2)], pk), (1, 2))
    assert again.has_error() and "already decrypted the sum of round 1" in again.error.reason
    _total(_ask(restarted, add_batches([_batch(data, c, 2) for c in (0, 1, 2)], pk), (0, 1, 2), rnd=2))
