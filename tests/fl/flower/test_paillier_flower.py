"""Packed Paillier over the privagg Flower runner, the key holder as its own node (in process).

The real ServerApp round (``serve``) over :class:`~tests.adversary.flower_harness.InProcessGrid`, which
hands every message to the real ClientApp with each node's own Context: three clients and one key-holder
node. Claims: the sum is exact and a training run equals the in-memory runner for the same seed; the
aggregator's side holds only the public key; the key holder is never a client; discovery refuses zero or
two key holders; what the launcher writes for the aggregator holds no private key.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from fl.config import PrivacyConfig, TrainConfig
from fl.runners.flower import FlowerJob, NodePolicy, write_app
from fl.runners.flower.keyholder import keygen, read_private_key, read_public_key
from fl.runners.flower.link import Progress
from fl.runners.flower.serverapp import serve
from secagg.machine import KEY_HOLDER
from tests.adversary.flower_harness import InProcessGrid, key_holder_context, node_context

KH_NODE = 900


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The key holder's key pair, made once by the documented command's function (2048 bits: the plan's)."""
    return keygen(tmp_path_factory.mktemp("keyholder"), bits=2048)


def _policy(tmp: Path, public: Path, **kw: Any) -> Path:
    fp = read_public_key(public).fingerprint.hex()
    return NodePolicy(protocols=("paillier",), paillier_key_fingerprint=fp, **kw).save(tmp / "policy.json")


def _grid(tmp: Path, job: FlowerJob, keys: tuple[Path, Path], *, holders: int = 1, **policy: Any) -> InProcessGrid:
    pol = _policy(tmp, keys[1], **policy)
    ctx = {100 + c: node_context(tmp, 100 + c, c, job.num_clients, job.to_json(), policy=pol)
           for c in range(job.num_clients)}
    for h in range(holders):
        ctx[KH_NODE + h] = key_holder_context(tmp, KH_NODE + h, job.to_json(), keys[0], policy=pol)
    return InProcessGrid(ctx)


def _sum_job(tmp: Path, public: Path, **kw: Any) -> FlowerJob:
    fields: dict[str, Any] = dict(task="sum", out=str(tmp / "out"), clients=3, size=300, rounds=2,
                                  protocol="paillier", threshold=0.6, join_timeout=5, start_timeout=20,
                                  phase_timeout=20, poll_interval=0.0, paillier_public_key=public.read_text())
    return FlowerJob(**{**fields, **kw})


def test_keygen_writes_a_private_key_only_its_owner_reads(keys: tuple[Path, Path]) -> None:
    private, public = keys
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert read_private_key(private).public == read_public_key(public)
    assert set(json.loads(public.read_text())) == {"kty", "g", "n"}  # no p, no q
    with pytest.raises(FileExistsError, match="once"):
        keygen(private.parent)
    with pytest.raises(ValueError, match="PUBLIC key"):
        read_public_key(private)  # the launcher refuses to put key.json into a job


def test_paillier_sum_job_over_flower_is_exact_and_the_key_holder_is_no_client(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    job = _sum_job(tmp_path, keys[1])
    grid = _grid(tmp_path, job, keys)
    result = serve(grid, job, Progress(Path(job.out)))  # type: ignore[arg-type]
    assert [r["exact"] for r in result["rounds"]] == [True, True]  # checked against the clients' inputs
    assert [r["included_ids"] for r in result["rounds"]] == [[0, 1, 2], [0, 1, 2]]
    assert result["nodes"][str(KEY_HOLDER)] == KH_NODE
    assert sorted(int(c) for c in result["nodes"]) == [KEY_HOLDER, 0, 1, 2]
    kinds = [(e["phase"], e["sent"]) for e in result["exchanges"]]
    assert kinds == [("input", 3), ("decrypt", 1)] * 2  # one decryption request per round, to the key holder
    assert "privagg-rounds" not in grid.contexts[KH_NODE].state  # it never contributed to a round


def test_a_key_holder_reply_speaking_for_a_client_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """The key holder's replies are checked like a client's: a decrypted sum claiming another sender never
    becomes the round's result (the round aborts, the run goes on)."""
    import dataclasses

    from flwr.app import Message

    from secagg import wire
    from tests.adversary.flower_harness import reply_with

    def as_client(req: Message, reply: Message) -> Message:
        fields = dict(reply.content["privagg"])
        if req.metadata.message_type != "query.privagg_keyholder" or "msgs" not in fields:
            return reply
        fields["msgs"] = [wire.dumps(dataclasses.replace(wire.loads(b), sender=0)) for b in fields["msgs"]]
        return reply_with(req, fields)

    job = _sum_job(tmp_path, keys[1])
    grid = _grid(tmp_path, job, keys)
    grid.tamper[KH_NODE] = as_client
    result = serve(grid, job, Progress(Path(job.out)))  # type: ignore[arg-type]
    assert [("aborted" in r, r["included"]) for r in result["rounds"]] == [(True, 0), (True, 0)]


@pytest.mark.parametrize("holders", [0, 2])
def test_discovery_needs_exactly_one_key_holder(tmp_path: Path, keys: tuple[Path, Path], holders: int) -> None:
    job = _sum_job(tmp_path, keys[1], join_timeout=0.5)
    with pytest.raises(RuntimeError, match=f"exactly one key-holder SuperNode, found {holders}"):
        serve(_grid(tmp_path, job, keys, holders=holders), job, Progress(Path(job.out)))  # type: ignore[arg-type]


def test_paillier_training_over_flower_equals_in_memory(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """clip + central noise + Paillier, 2 rounds: the Flower model equals the in-memory runner's exactly."""
    from fl.training.loop import Federation

    config = TrainConfig(
        dataset="breast_cancer", clients=3, rounds=2, seed=7, model="logreg",
        insecure_seeded_randomness=True,  # the named test seam: same noise and rounding in both runs
        privacy=PrivacyConfig(spec="clip,noise,paillier", clip=1.0, noise_multiplier=0.5),
    )
    job = FlowerJob(task="train", out=str(tmp_path / "out"), config=config.as_dict(), join_timeout=5,
                    start_timeout=60, phase_timeout=30, poll_interval=0.0, paillier_public_key=keys[1].read_text())
    grid = _grid(tmp_path, job, keys, allow_insecure_seeded_randomness=True)
    result = serve(grid, job, Progress(Path(job.out)))  # type: ignore[arg-type]

    fed = Federation(config)
    for r in (1, 2):
        fed.run_round(r)
    np.testing.assert_array_equal(np.load(result["params_file"]), fed.params)
    assert [r["included_ids"] for r in result["rounds"]] == [[0, 1, 2], [0, 1, 2]]
    report = result["report"]
    assert report["pipeline"] == fed.plan.pipeline.name and report["pipeline"].endswith("paillier")
    fingerprint = read_public_key(keys[1]).fingerprint.hex()
    in_memory = json.loads(json.dumps(fed.ledger.as_list(), default=str))
    assert fingerprint in json.dumps(report["ledger"])  # the guarantee names the key holder's key ...
    assert _without_key(report["ledger"]) == _without_key(in_memory)  # ... and is otherwise the in-memory ledger


def _without_key(ledger: Any) -> Any:
    """The ledger with the Paillier key fingerprint blanked (the in-memory run makes its own key pair)."""
    if isinstance(ledger, dict):
        return {k: "KEY" if k == "key_fingerprint" else _without_key(v) for k, v in ledger.items()}
    if isinstance(ledger, list):
        return [_without_key(v) for v in ledger]
    return ledger


def test_the_app_the_launcher_writes_carries_only_the_public_key(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    job = _sum_job(tmp_path, keys[1])
    app = write_app(tmp_path / "app", job)
    private = read_private_key(keys[0])
    text = (app / "pyproject.toml").read_text()
    assert str(private.public.n) in text
    assert str(private.p) not in text and str(private.q) not in text


# ---- the documented commands ---------------------------------------------------------------------------
def _cli(argv: list[str]) -> Any:
    import argparse

    from fl.cli import flower as flower_cli

    parser = argparse.ArgumentParser(prog="privagg flower")
    flower_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_keygen_policy_and_job_carry_only_the_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fl.cli import flower as flower_cli

    kdir = tmp_path / "kh"
    assert flower_cli.run(_cli(["--home", str(tmp_path / "home"), "paillier-keygen", "--out", str(kdir),
                                "--bits", "1024"])) == 0
    assert stat.S_IMODE(os.stat(kdir / "key.json").st_mode) == 0o600
    assert "--paillier-key" in capsys.readouterr().out
    fp = read_public_key(kdir / "public.json").fingerprint.hex()
    assert flower_cli.run(_cli(["policy", "--out", str(tmp_path / "p.json"), "--paillier-key",
                                str(kdir / "public.json"), "--min-summands", "3"])) == 0
    policy = NodePolicy.load(tmp_path / "p.json")
    assert "paillier" in policy.protocols and policy.paillier_key_fingerprint == fp and policy.min_summands == 3
    run = ["run", "--insecure", "--task", "sum", "--clients", "3", "--privacy", "paillier"]
    job = flower_cli._job(_cli([*run, "--paillier-public-key", str(kdir / "public.json")]))
    assert job.protocol == "paillier" and read_public_key(kdir / "public.json").to_json() == job.paillier_public_key
    with pytest.raises(ValueError, match="PUBLIC key"):  # the private key never goes into a job
        flower_cli._job(_cli([*run, "--paillier-public-key", str(kdir / "key.json")]))


def test_cli_key_holder_node_command(tmp_path: Path) -> None:
    from fl.cli import flower as flower_cli
    from fl.runners.flower import supernode_command

    private, _ = keygen(tmp_path / "kh", bits=1024)
    args = _cli(["supernode", "--key-holder", "--paillier-key", str(private), "--insecure"])
    assert flower_cli._key_holder_key(args) == private.resolve()
    cmd = supernode_command(superlink="127.0.0.1:9", partition=None, state_key=tmp_path / "s.key", key_holder=private)
    config = cmd[cmd.index("--node-config") + 1]
    assert 'role="key-holder"' in config and f'paillier-key-file="{private}"' in config and "partition" not in config
    for bad, why in ((["--key-holder", "--insecure"], "needs --paillier-key"),
                     (["--partition", "0/3", "--key-holder", "--paillier-key", str(private), "--insecure"], "or"),
                     (["--insecure"], "--partition I/N")):
        with pytest.raises(ValueError, match=why):
            flower_cli._key_holder_key(_cli(["supernode", *bad]))
    os.chmod(private, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        flower_cli._key_holder_key(args)


# ---- real processes ------------------------------------------------------------------------------------
@pytest.mark.flower
@pytest.mark.slow
def test_paillier_over_tls_with_a_key_holder_node(tmp_path: Path) -> None:
    """LocalCluster: SuperLink, 3 client SuperNodes and 1 key-holder SuperNode, TLS; 2 exact rounds; nothing the
    aggregator side wrote or received holds the private key."""
    from fl.runners.flower import LocalCluster
    from fl.runners.flower.processes import group_alive

    private, public = keygen(tmp_path / "keyholder-site", bits=2048)
    fp = read_public_key(public).fingerprint.hex()
    job = _sum_job(tmp_path, public, size=2000, join_timeout=60, poll_interval=0.05)
    cluster = LocalCluster(tmp_path / "cluster", 3, tls=True, fleet_poll=0.1, key_holder=private,
                           policy=NodePolicy(protocols=("paillier",), paillier_key_fingerprint=fp))
    try:
        cluster.start(timeout=60)
        result = cluster.run(job, timeout=150)
    finally:
        cluster.stop()
    assert not [p.pid for p in [cluster.superlink, *cluster.nodes.values()] if group_alive(p.pid)]
    assert "https://" in (cluster.logs / "superlink.log").read_text()
    assert [r["exact"] for r in result["rounds"]] == [True, True]
    assert [r["included_ids"] for r in result["rounds"]] == [[0, 1, 2], [0, 1, 2]]
    assert str(KEY_HOLDER) in result["nodes"] and len(result["nodes"]) == 4
    secret = read_private_key(private)
    aggregator_side = [tmp_path / "out", cluster.workdir / "app", cluster.home, cluster.logs / "superlink.log"]
    files = [f for d in aggregator_side for f in ([d] if d.is_file() else d.rglob("*")) if f.is_file()]
    assert files and any("progress" in f.name for f in files)
    for f in files:
        text = f.read_bytes().decode("latin-1")
        assert str(secret.p) not in text and str(secret.q) not in text, f
