"""Our secure aggregation over real Flower processes (SuperLink + 3 SuperNodes) on 127.0.0.1 with TLS.

Skipped when Flower is not installed (``pip install -e '.[flower]'``). Each test starts its own cluster
through :class:`fl.runners.flower.LocalCluster` in a fixture that stops exactly the process groups it
started, by PID, also when the test fails, and then checks that none of them is left.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord

from fl.config import PrivacyConfig, TrainConfig
from fl.runners.flower import FlowerJob, LocalCluster, NodePolicy, wait_result
from fl.runners.flower.processes import group_alive

pytestmark = [pytest.mark.flower]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """SuperLink + 3 SuperNodes with TLS on 127.0.0.1, stopped by PID (process group) in all cases."""
    # The Flower == in-memory test needs the seeded-randomness seam; these nodes' own policy allows it.
    c = LocalCluster(tmp_path / "cluster", 3, tls=True, host="127.0.0.1", fleet_poll=0.1,
                     policy=NodePolicy(allow_insecure_seeded_randomness=True))
    try:
        c.start(timeout=60)
        yield c
    finally:
        c.stop()
        started = [p.pid for p in [c.superlink, *c.nodes.values()] if p is not None]
        assert started, "the fixture started no process"
        assert not [pid for pid in started if group_alive(pid)], "a Flower process group outlived the test"


def _progress(out: Path) -> list[dict[str, Any]]:
    path = out / "progress.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("in_flight", [1, 2])
def test_secagg_plus_with_dp_over_flower_equals_in_memory(cluster: LocalCluster, tmp_path: Path,
                                                          in_flight: int) -> None:
    """2 rounds of clip + distributed Gaussian noise + SecAgg+ across processes == the in-memory run, one
    round after another and (``in_flight=2``) with round 2's key agreement ahead, in 2R + 2 exchanges."""
    from fl.training.loop import Federation

    config = TrainConfig(
        dataset="breast_cancer", clients=3, rounds=2, seed=7, model="logreg",
        insecure_seeded_randomness=True,  # the named test seam: same noise and rounding in both runs
        privacy=PrivacyConfig(spec="clip,dnoise,secagg+", clip=1.0, noise_multiplier=1.0, threshold=0.6),
    )
    job = FlowerJob(task="train", out=str(tmp_path / "out"), config=config.as_dict(), join_timeout=60,
                    start_timeout=60, phase_timeout=30, rounds_in_flight=in_flight)
    assert "https://127.0.0.1" in (cluster.logs / "superlink.log").read_text()  # TLS, loopback only
    result = cluster.run(job, timeout=150)

    fed = Federation(config)
    for r in (1, 2):
        fed.run_round(r)
    flower_params = np.load(result["params_file"])
    np.testing.assert_array_equal(flower_params, fed.params)
    assert [r["included_ids"] for r in result["rounds"]] == [[0, 1, 2], [0, 1, 2]]
    report = result["report"]
    assert report["pipeline"] == fed.plan.pipeline.name
    assert "secagg+" in report["pipeline"] and "noise" in report["pipeline"]
    assert report["ledger"] == json.loads(json.dumps(fed.ledger.as_list(), default=str))
    final = report["final"]  # the headline adds the preprocessing statistics' epsilon to training's
    assert final.get("epsilon_training", final.get("epsilon")) == pytest.approx(fed.history[-1]["epsilon"])
    assert final["epsilon"] == pytest.approx(fed.report(baseline=None)["final"]["epsilon"])
    for rnd in (1, 2):
        assert [e["phase"] for e in result["exchanges"] if e["round"] == rnd] == ["advertise", "share", "masked",
                                                                                  "unmask"]
    if in_flight == 2:
        assert len({e["bundle"] for e in result["exchanges"]}) == 2 * 2 + 2


@pytest.mark.slow
def test_round_completes_when_a_supernode_dies_mid_round(cluster: LocalCluster, tmp_path: Path) -> None:
    """Kill SuperNode 2 after the key-sharing phase: the round finishes with the t = 2 survivors, exactly."""
    out = tmp_path / "out"
    job = FlowerJob(task="sum", out=str(out), clients=3, size=1000, rounds=1, protocol="secagg+", threshold=0.6,
                    join_timeout=60, start_timeout=60, phase_timeout=8)
    cluster.submit(job)
    deadline = time.monotonic() + 90
    while not any(e.get("event") == "phase" and e.get("phase") == "share" for e in _progress(out)):
        assert time.monotonic() < deadline, f"the round never reached the share phase: {_progress(out)}"
        assert not (out / "error.json").is_file(), (out / "error.json").read_text()
        time.sleep(0.05)
    cluster.kill_node(2)
    result = wait_result(out, timeout=90, processes=[cluster.superlink])
    (round1,) = result["rounds"]
    assert round1["exact"] is True  # the server checked the sum against exactly the included inputs
    phases = {e["phase"]: e for e in result["exchanges"]}
    assert phases["unmask"]["answered"] == 2  # node 2 is dead by then: t = 2 survivors finish the round
    # Node 2 dies before it can answer the masked-input phase (its ClientApp needs > 0.3 s), so its input
    # is left out and its pairwise masks are removed from the survivors' shares of its key.
    assert round1["included_ids"] == [0, 1]
    assert phases["masked"]["sent"] == 3 and phases["masked"]["answered"] == 2


@pytest.mark.slow
def test_rounds_in_flight_over_real_processes(cluster: LocalCluster, tmp_path: Path) -> None:
    """A sum job with 4 rounds in flight over real SuperNodes with TLS: 5 rounds in 5 + 3 Flower exchanges
    (one bundled message per node each), every sum exact."""
    out = tmp_path / "out"
    job = FlowerJob(task="sum", out=str(out), clients=3, size=1000, rounds=5, protocol="secagg+", threshold=0.6,
                    join_timeout=60, start_timeout=60, phase_timeout=30, rounds_in_flight=4)
    cluster.submit(job)
    result = wait_result(out, timeout=240, processes=[cluster.superlink])
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3, 4, 5]
    assert all(r["exact"] is True and r["included"] == 3 for r in result["rounds"])
    assert len({e["bundle"] for e in result["exchanges"]}) == 8
    assert len(result["exchanges"]) == 20  # each round ran its own four phases


# ---- fast checks of the pieces (no processes) ------------------------------------------------------------


def _context(tmp_path: Path, node_id: int) -> Any:
    from flwr.app import Context, RecordDict

    from fl.runners.flower import make_state_key

    key = make_state_key(tmp_path / "node.key")
    return Context(run_id=1, node_id=node_id, node_config={"state-key-file": str(key)}, state=RecordDict(),
                   run_config={})


def test_sealed_client_state_round_trips_and_refuses_tampering_and_rollback(tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    from fl.runners.flower import state
    from fl.spec import ValueSpec
    from fl.sums.secagg import SecAggPlus
    from secagg.errors import ProtocolError

    spec = ValueSpec(size=8, cohort=3, domain="ring", modulus=1 << 32, value_bits=20)
    machines = {c: SecAggPlus(threshold=0.6).client(c, np.arange(8, dtype=np.uint64) + c, spec=spec,
                                                    session=b"s" * 16, round=1) for c in range(3)}
    advs = [m.start()[0] for m in machines.values()]
    ctx = _context(tmp_path, node_id=5)
    state.store(ctx, machines[0], session=b"s" * 16, round=1, step=0)
    rec = ctx.state[state.STATE_RECORD]
    blob = bytes(rec["blob"])
    assert b"s" * 16 not in blob and b"PAGS" not in blob  # sealed, not just encoded
    old = state.STATE_RECORD, ConfigRecord(dict(rec))
    restored = state.load(ctx, session=b"s" * 16, round=1, step=0)
    assert restored.cid == 0 and restored.state == machines[0].state
    assert restored.snapshot() == machines[0].snapshot()  # the same secrets, the same phase
    assert len(advs) == 3
    # rollback: after the next step is stored, the step-0 record (replayed by whoever holds the store) is refused
    state.store(ctx, restored, session=b"s" * 16, round=1, step=1)
    ctx.state[old[0]] = old[1]
    with pytest.raises(ProtocolError, match="old state replayed"):
        state.load(ctx, session=b"s" * 16, round=1, step=1)
    # relabelling the old record as step 1 does not help: step and phase are in the AEAD's associated data
    forged = dict(old[1])
    forged["step"] = 1
    ctx.state[state.STATE_RECORD] = ConfigRecord(forged)
    with pytest.raises(ProtocolError, match="authenticate"):
        state.load(ctx, session=b"s" * 16, round=1, step=1)
    ctx.state[old[0]] = old[1]
    with pytest.raises(ProtocolError):  # another round or session
        state.load(ctx, session=b"s" * 16, round=2, step=0)
    tampered = dict(old[1])
    tampered["blob"] = blob[:-1] + bytes([blob[-1] ^ 1])
    ctx.state[state.STATE_RECORD] = ConfigRecord(tampered)
    with pytest.raises(ProtocolError, match="authenticate"):
        state.load(ctx, session=b"s" * 16, round=1, step=0)
    for other in (_context(tmp_path / "x", node_id=5),  # another key
                  Context(run_id=1, node_id=6, node_config=dict(ctx.node_config), state=RecordDict(),
                          run_config={}),  # same key, another node
                  Context(run_id=2, node_id=5, node_config=dict(ctx.node_config), state=RecordDict(),
                          run_config={})):  # same key and node, another run
        other.state[state.STATE_RECORD] = old[1]
        with pytest.raises(ProtocolError, match="authenticate"):
            state.load(other, session=b"s" * 16, round=1, step=0)


def test_state_key_missing_names_the_fix(tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    from fl.runners.flower.clientapp import _state_key

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(RuntimeError, match="privagg flower supernode"):
        _state_key(ctx)


def test_certificates_verify_for_loopback(tmp_path: Path) -> None:
    import ipaddress

    from cryptography import x509

    from fl.runners.flower import make_certificates

    paths = make_certificates(tmp_path, hosts=("127.0.0.1", "localhost"))
    ca = x509.load_pem_x509_certificate(paths.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert oct(paths.key.stat().st_mode & 0o777) == "0o600"


def test_app_and_job_round_trip_through_flower_config(tmp_path: Path) -> None:
    from flwr.cli.config_utils import load_and_validate

    from fl.runners.flower import FlowerJob, write_app

    config = TrainConfig(clients=4, rounds=3, privacy=PrivacyConfig(spec="clip,secagg+"))
    job = FlowerJob(task="train", out=str(tmp_path / "out"), config=config.as_dict(), phase_timeout=7.5)
    app = write_app(tmp_path / "app", job)
    toml, _ = load_and_validate(app / "pyproject.toml", check_module=False)
    comps = toml["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "fl.runners.flower:server_app", "clientapp": "fl.runners.flower:client_app"}
    back = FlowerJob.from_json(toml["tool"]["flwr"]["app"]["config"]["job"])
    assert back.phase_timeout == 7.5 and back.num_clients == 4 and back.num_rounds == 3
    assert back.config["privacy"]["spec"] == "clip,secagg+"
    with pytest.raises(ValueError, match="unknown Flower job field"):
        FlowerJob.from_json(json.dumps({"task": "sum", "bogus": 1}))


def test_commands_and_environment(tmp_path: Path) -> None:
    from fl.runners.flower import CertPaths, flower_env, superlink_command, supernode_command

    env = flower_env(tmp_path / "home", base={"PATH": "/usr/bin"})
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    certs = CertPaths(tmp_path / "ca.pem", tmp_path / "s.pem", tmp_path / "s.key")
    link = superlink_command(host="127.0.0.1", port=18000, certs=certs)
    assert "--insecure" not in link and "--ssl-certfile" in link and "--disable-runtime-dependency-installation" in link
    assert "--insecure" in superlink_command(port=18000, certs=None)
    node = supernode_command(superlink="127.0.0.1:18000", partition=(1, 3), state_key=tmp_path / "k", port=9200,
                             ca=certs.ca)
    assert node[node.index("--root-certificates") + 1] == str(certs.ca)
    assert "partition-id=1 num-partitions=3" in node[node.index("--node-config") + 1]
    with pytest.raises(ValueError, match="0 <= I < N"):
        supernode_command(superlink="x:1", partition=(3, 3), state_key=tmp_path / "k")


def test_cli_parses_and_rejects_bad_partition() -> None:
    import argparse

    from fl.cli import flower as flower_cli

    parser = argparse.ArgumentParser(prog="privagg flower")
    flower_cli.add_arguments(parser)
    args = parser.parse_args(["supernode", "--partition", "2/3", "--ca", "ca.pem", "--port", "9096"])
    assert args.partition == (2, 3) and args.port == 9096 and args.fleet_poll > 0
    with pytest.raises(SystemExit):
        parser.parse_args(["supernode", "--partition", "3/3", "--insecure"])
    with pytest.raises(SystemExit):  # TLS or --insecure must be chosen explicitly
        parser.parse_args(["superlink"])
    run = parser.parse_args(
        ["run", "--insecure", "--clients", "3", "--privacy", "clip,secagg+", "--phase-timeout", "9"]
    )
    job = flower_cli._job(run)
    assert job.task == "train" and job.phase_timeout == 9 and job.config["privacy"]["spec"] == "clip,secagg+"


# ---- who may join, and which code a node runs (issue 9: process tests) ------------------------------------

_EVIL_APP = '''
import json
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    deadline = time.time() + 60
    while not nodes and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    msgs = [Message(RecordDict({"x": ConfigRecord({"a": 1})}), dst_node_id=n, message_type="query") for n in nodes]
    replies = grid.send_and_receive(msgs, timeout=60)
    out = [r.error.reason if r.has_error() else "ran" for r in replies]
    with open(context.run_config["out"], "w") as fh:
        json.dump(out, fh)


@client.query()
def query(msg: Message, context: Context) -> Message:
    with open(context.run_config["marker"], "w") as fh:
        fh.write("the server's code ran on this node")
    return Message(RecordDict({"x": ConfigRecord({"b": 1})}), reply_to=msg)
'''


def _evil_app(directory: Path, *, out: Path, marker: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "evil.py").write_text(_EVIL_APP)
    (directory / "pyproject.toml").write_text("\n".join([
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "evil"', 'version = "1.0.0"', 'license = "Apache-2.0"', "dependencies = []", "",
        "[tool.flwr.app]", 'publisher = "mallory"', "",
        "[tool.flwr.app.components]", 'serverapp = "evil:server"', 'clientapp = "evil:client"', "",
        "[tool.flwr.app.config]", f'out = "{out}"', f'marker = "{marker}"', "",
    ]))
    return directory


@pytest.mark.slow
def test_a_node_refuses_app_code_the_server_ships(tmp_path: Path) -> None:
    """The server ships its own app code (FAB), then a weak job: the privagg SuperNode refuses both, stays up."""
    out, marker = tmp_path / "evil-out.json", tmp_path / "pwned"
    with LocalCluster(tmp_path / "c", 1, tls=True, fleet_poll=0.1) as c:
        c.submit_app(_evil_app(tmp_path / "evil", out=out, marker=marker))
        deadline = time.monotonic() + 120
        while not out.is_file():
            assert time.monotonic() < deadline, "the evil ServerApp never got a reply"
            time.sleep(0.2)
        assert c.nodes[0].poll() is None, "the node should refuse the run, not die"
        # ... and, with its default policy, the privagg app with a job weaker than the policy is refused too
        weak = FlowerJob(task="sum", out=str(tmp_path / "weak"), clients=1, size=10, protocol="plain",
                         join_timeout=30, start_timeout=30, phase_timeout=10)
        with pytest.raises(RuntimeError, match="policy refuses the job: protocol 'plain'"):
            c.run(weak, timeout=120)
        log = (c.logs / "supernode0.log").read_text()
    (reason,) = json.loads(out.read_text())
    assert "UntrustedAppError" in reason and "ships its own files" in reason
    assert not marker.exists(), "the SuperNode ran code the server shipped"
    assert "refusing run" in log


@pytest.mark.slow
def test_only_registered_supernodes_can_join(tmp_path: Path) -> None:
    """SuperNode authentication: a node whose key was not registered is refused; the registered one joins."""
    import subprocess

    with LocalCluster(tmp_path / "c", 1, tls=True, fleet_poll=0.1, supernode_auth=True) as c:
        intruder = c.start_node(1, register=False)
        assert intruder.wait(timeout=60) != 0, "an unregistered SuperNode stayed connected"
        cp = subprocess.run([_flwr(), "supernode", "list", "privagg", "--format", "json"], env=c.env,
                            capture_output=True, text=True, timeout=60, cwd=c.workdir)
        nodes = json.loads(cp.stdout)["nodes"]
        assert c.nodes[0].poll() is None
    assert len(nodes) == 1 and nodes[0]["status"] == "online"
    assert "Failed to activate SuperNode" in (c.logs / "supernode1.log").read_text()


def _flwr() -> str:
    from fl.runners.flower.processes import exe_path

    return exe_path("flwr")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec, inside Flower's FAB builder
def test_app_pin_accepts_only_the_installed_privagg_app(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk

    from fl.runners.flower import write_app
    from fl.runners.flower.pin import UntrustedAppError, check_fab
    from secagg._hazmat.pki import sha256_hex

    ours = build_fab_from_disk(write_app(tmp_path / "ours", FlowerJob(task="sum")))
    check_fab(ours, NodePolicy())  # only pyproject.toml, components = the installed privagg apps
    evil = build_fab_from_disk(_evil_app(tmp_path / "evil", out=tmp_path / "o", marker=tmp_path / "m"))
    with pytest.raises(UntrustedAppError, match="ships its own files"):
        check_fab(evil, NodePolicy())
    check_fab(evil, NodePolicy(trusted_app_hashes=(sha256_hex(evil),)))  # the operator trusts this bundle
    check_fab(evil, NodePolicy(allow_any_app=True))
    renamed = tmp_path / "renamed"
    write_app(renamed, FlowerJob(task="sum"))
    toml = (renamed / "pyproject.toml").read_text().replace('clientapp = "fl.runners.flower:client_app"',
                                                              'clientapp = "os:system"')
    (renamed / "pyproject.toml").write_text(toml)
    with pytest.raises(UntrustedAppError, match="not the installed privagg apps"):
        check_fab(build_fab_from_disk(renamed), NodePolicy())
    with pytest.raises(UntrustedAppError, match="not a zip"):
        check_fab(b"not a zip", NodePolicy())


def test_plaintext_outside_loopback_needs_the_explicit_flag(tmp_path: Path) -> None:
    from fl.runners.flower import (
        InsecureTransportError,
        is_loopback,
        superlink_command,
        supernode_command,
        write_connection,
    )

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.org")
    key = tmp_path / "k"
    with pytest.raises(InsecureTransportError, match="--insecure-i-know"):
        superlink_command(host="0.0.0.0", certs=None)
    with pytest.raises(InsecureTransportError, match="without TLS"):
        supernode_command(superlink="10.0.0.5:8000", partition=(0, 2), state_key=key)
    with pytest.raises(InsecureTransportError):
        supernode_command(superlink="127.0.0.1:8000", partition=(0, 2), state_key=key, host="0.0.0.0")
    with pytest.raises(InsecureTransportError):
        write_connection(tmp_path / "home", "hospital.example.org:8000", ca=None)
    assert "--insecure" in superlink_command(host="0.0.0.0", certs=None, allow_insecure_remote=True)
    assert "--insecure" in supernode_command(superlink="10.0.0.5:8000", partition=(0, 2), state_key=key,
                                             allow_insecure_remote=True)
    assert "--insecure" in supernode_command(superlink="[::1]:8000", partition=(0, 2), state_key=key)
    write_connection(tmp_path / "home", "127.0.0.1:8000", ca=None)  # loopback: allowed


def test_cli_refuses_plaintext_to_remote_and_open_superlinks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from fl.cli import flower as flower_cli

    parser = argparse.ArgumentParser(prog="privagg flower")
    flower_cli.add_arguments(parser)
    home = ["--home", str(tmp_path / "home")]
    node = parser.parse_args([*home, "supernode", "--partition", "0/2", "--superlink", "10.1.2.3:8000", "--insecure",
                              "--state-key", str(tmp_path / "missing.key")])
    key = tmp_path / "state.key"
    key.write_text("00" * 32)
    node.state_key = key
    assert flower_cli.run(node) == 2  # refused before anything starts (the success path would exec Flower)
    assert "--insecure-i-know" in capsys.readouterr().err
    link = parser.parse_args([*home, "superlink", "--insecure"])
    assert flower_cli.run(link) == 2
    assert "SuperNode authentication needs TLS" in capsys.readouterr().err
    remote = parser.parse_args([*home, "superlink", "--insecure", "--no-supernode-auth", "--host", "0.0.0.0"])
    assert flower_cli.run(remote) == 2
    assert "without TLS" in capsys.readouterr().err
    out = tmp_path / "policy.json"
    pol = parser.parse_args([*home, "policy", "--out", str(out), "--min-noise-multiplier", "0.8", "--min-clients", "3"])
    assert flower_cli.run(pol) == 0
    saved = NodePolicy.load(out)
    assert saved.min_noise_multiplier == 0.8 and saved.min_clients == 3 and "plain" not in saved.protocols
    sparse = parser.parse_args([*home, "policy", "--out", str(out), "--min-security-bits", "50", "--assumed-corrupt",
                                "0.2", "--assumed-dropout", "0.05"])
    assert flower_cli.run(sparse) == 0
    saved = NodePolicy.load(out)  # the SecAgg+ security terms this node judges sparse graphs by
    assert (saved.min_security_bits, saved.assumed_corrupt, saved.assumed_dropout) == (50.0, 0.2, 0.05)
