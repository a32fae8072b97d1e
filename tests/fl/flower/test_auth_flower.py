"""Authenticated SecAgg / SecAgg+ over Flower: identity keys per node, a pinned roster, the consistency round.

Each node holds only its own private identity key and the consortium's roster of public keys (received
out of band, its SHA-256 pinned in the node's policy); the ServerApp holds only the public keys the job
carries. In-process tests drive the real ServerApp ``serve`` and the real ClientApp through
:class:`tests.adversary.flower_harness.InProcessGrid`; the adversaries are a ServerApp that ships
another roster or substitutes a client's keys, and one that shows two survivor lists (split view).
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

from flwr.app import Context, Message

from fl.config import PrivacyConfig, TrainConfig
from fl.runners.flower import FlowerJob, NodePolicy
from fl.runners.flower.identity import (
    IDENTITY_KEY_FILE,
    IDENTITY_ROSTER_FILE,
    IdentityError,
    Roster,
    check_identity,
    make_identity,
    provision_local,
)
from fl.runners.flower.link import Progress
from fl.runners.flower.serverapp import serve
from fl.sums.secagg import FixedIdentities, IdentityRegistry, SecAgg, SecAggPlus
from tests.adversary.flower_harness import InProcessGrid, deliver, instruction, node_context, server_identity

N = 3


@pytest.fixture(autouse=True)
def _as_server(monkeypatch: pytest.MonkeyPatch) -> None:
    server_identity(monkeypatch)


def _setup(tmp: Path, n: int = N, *, pin: bool = True, **policy: Any) -> tuple[list[Path], Path, Roster, Path]:
    keys, roster_path, roster = provision_local(tmp / "identity", n)
    pol = NodePolicy(roster_sha256=roster.fingerprint() if pin else None, **policy).save(tmp / "policy.json")
    return keys, roster_path, roster, pol


def _contexts(tmp: Path, job: FlowerJob, keys: list[Path], roster: Path, policy: Path) -> dict[int, Context]:
    return {100 + c: node_context(tmp, 100 + c, c, job.num_clients, job.to_json(), policy=policy,
                                  extra={IDENTITY_KEY_FILE: str(keys[c]), IDENTITY_ROSTER_FILE: str(roster)})
            for c in range(job.num_clients)}


def _sum_job(tmp: Path, roster: Roster | None, **kw: Any) -> FlowerJob:
    fields: dict[str, Any] = dict(task="sum", out=str(tmp / "out"), clients=N, size=64, rounds=2,
                                  protocol="secagg+", threshold=0.7, authenticated=True,
                                  roster=None if roster is None else roster.to_dict(), join_timeout=5,
                                  start_timeout=5, phase_timeout=5, poll_interval=0.0)
    fields.update(kw)
    return FlowerJob(**fields)


def _hello(ctx: Context) -> Message:
    return deliver(instruction(ctx.node_id, "query.privagg_hello", {"hello": 1}), ctx)


# ---------------------------------------------------------------- provisioning
def test_identity_files_keep_the_private_key_0600_and_never_overwrite(tmp_path: Path) -> None:
    key, pub = make_identity(tmp_path, "hospital-a")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    public = json.loads(pub.read_text())
    assert public["site"] == "hospital-a" and len(bytes.fromhex(public["public_key"])) == 32
    assert "private" not in pub.read_text() and key.read_text().strip() not in pub.read_text()
    with pytest.raises(FileExistsError, match="never overwritten"):
        make_identity(tmp_path, "hospital-a")
    roster = Roster.assemble([pub, make_identity(tmp_path, "hospital-b")[1]])
    assert check_identity(key, roster, 0, pin=roster.fingerprint())  # its own entry: accepted
    os.chmod(key, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        check_identity(key, roster, 0)


def test_roster_parsing_is_strict_and_its_fingerprint_covers_every_key(tmp_path: Path) -> None:
    _, _, roster, _ = _setup(tmp_path)
    assert Roster.from_dict(json.loads(json.dumps(roster.to_dict()))) == roster
    data = roster.to_dict()
    data["clients"]["1"]["public_key"] = data["clients"]["2"]["public_key"]
    with pytest.raises(ValueError, match="distinct"):
        Roster.from_dict(data)
    with pytest.raises(ValueError, match="version"):
        Roster.from_dict({**roster.to_dict(), "extra": 1})
    other = provision_local(tmp_path / "other", N)[2]
    assert other.fingerprint() != roster.fingerprint()


def test_cli_provisions_identities_roster_and_a_pinned_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    from fl.cli.main import main

    for site in ("a", "b"):
        assert main(["flower", "identity", "--name", site, "--out", str(tmp_path / site)]) == 0
    roster_path = tmp_path / "roster.json"
    assert main(["flower", "roster", "--out", str(roster_path), str(tmp_path / "a" / "a.identity.json"),
                 str(tmp_path / "b" / "b.identity.json")]) == 0
    roster = Roster.load(roster_path)
    assert roster.fingerprint() in capsys.readouterr().out
    assert main(["flower", "policy", "--out", str(tmp_path / "p.json"), "--roster", str(roster_path),
                 "--require-authenticated"]) == 0
    policy = NodePolicy.load(tmp_path / "p.json")
    assert policy.roster_sha256 == roster.fingerprint() and policy.require_authenticated


def test_a_node_whose_key_does_not_match_its_roster_entry_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, roster_path, roster, pol = _setup(tmp_path)
    with pytest.raises(IdentityError, match="does not match the roster's entry for partition 1"):
        check_identity(keys[0], roster, 1)
    from fl.cli.main import main

    args = ["flower", "supernode", "--partition", "1/3", "--insecure", "--identity-key", str(keys[0]),
            "--identity-roster", str(roster_path), "--policy", str(pol), "--state-key", str(keys[0])]
    assert main(args) == 2  # refused before any Flower process starts
    assert "does not match the roster's entry for partition 1" in capsys.readouterr().err
    job = _sum_job(tmp_path, roster)
    ctx = node_context(tmp_path, 101, 1, N, job.to_json(), policy=pol,
                       extra={IDENTITY_KEY_FILE: str(keys[0]), IDENTITY_ROSTER_FILE: str(roster_path)})
    reply = _hello(ctx)
    assert reply.has_error() and "does not match the roster's entry for partition 1" in reply.error.reason


# ---------------------------------------------------------------- honest runs
@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
def test_an_authenticated_sum_over_flower_is_exact_with_the_consistency_round(tmp_path: Path, protocol: str) -> None:
    keys, roster_path, roster, pol = _setup(tmp_path, require_authenticated=True)
    job = _sum_job(tmp_path, roster, protocol=protocol)
    result = serve(InProcessGrid(_contexts(tmp_path, job, keys, roster_path, pol)), job,  # type: ignore[arg-type]
                   Progress(Path(job.out)))
    assert [(r["exact"], r["included_ids"]) for r in result["rounds"]] == [(True, [0, 1, 2])] * 2
    assert [e["phase"] for e in result["exchanges"]] == ["advertise", "share", "masked", "consistency", "unmask"] * 2


@pytest.mark.parametrize("in_flight", [1, 2])
def test_authenticated_training_over_flower_equals_the_in_memory_run(tmp_path: Path, in_flight: int) -> None:
    """Bit for bit the in-memory authenticated run, one round after another and (``in_flight=2``) with
    round 2's signed key agreement ahead of round 1's consistency round and unmask."""
    from fl.training.loop import Federation

    config = TrainConfig(dataset="breast_cancer", clients=N, rounds=2, seed=3, model="logreg",
                         insecure_seeded_randomness=True,
                         privacy=PrivacyConfig(spec="clip,dnoise,secagg+", clip=1.0, noise_multiplier=1.0,
                                               threshold=0.7, authenticated=True))
    keys, roster_path, roster, pol = _setup(tmp_path, allow_insecure_seeded_randomness=True,
                                            require_authenticated=True)
    job = FlowerJob(task="train", out=str(tmp_path / "out"), config=config.as_dict(), roster=roster.to_dict(),
                    join_timeout=5, start_timeout=60, phase_timeout=10, poll_interval=0.0, rounds_in_flight=in_flight)
    grid = InProcessGrid(_contexts(tmp_path, job, keys, roster_path, pol))
    result = serve(grid, job, Progress(Path(job.out)))  # type: ignore[arg-type]
    assert grid.sent == N * (1 + (5 * 2 if in_flight == 1 else 2 + 5 + 1))  # hello, then the exchanges
    fed = Federation(config)
    assert isinstance(fed.plan.pipeline.sum, SecAggPlus) and fed.plan.pipeline.sum.authenticated
    for r in (1, 2):
        fed.run_round(r)
    np.testing.assert_array_equal(np.load(result["params_file"]), fed.params)
    assert [r["included_ids"] for r in result["rounds"]] == [[0, 1, 2]] * 2
    assert "consistency" in [e["phase"] for e in result["exchanges"]]
    (g,) = [g for e in result["report"]["ledger"] if e["round"] == 1 for g in e["guarantees"]
            if g["layer"] == "secagg+"]
    assert g["against"].startswith("an active (malicious) server") and g["params"]["authenticated"] is True


def test_an_authenticated_round_over_flower_survives_a_dropout_after_key_sharing(tmp_path: Path) -> None:
    """Node 2 dies before sending its masked input (t = 2 of 3): the two survivors sign the survivor list,
    unmask node 2's pairwise masks, and the sum of exactly their inputs comes out."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    from secagg import wire
    from secagg.masking.messages import MaskedInput

    def dies(req: Message, reply: Message) -> Message:
        msgs = [] if reply.has_error() else [wire.loads(b) for b in reply.content["privagg"].get("msgs", [])]
        if any(isinstance(m, MaskedInput) for m in msgs):
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="node died"), reply_to=req)
        return reply

    keys, roster_path, roster, pol = _setup(tmp_path)
    job = _sum_job(tmp_path, roster, rounds=1, threshold=0.6)
    grid = InProcessGrid(_contexts(tmp_path, job, keys, roster_path, pol), {102: dies})
    result = serve(grid, job, Progress(Path(job.out)))  # type: ignore[arg-type]
    (r1,) = result["rounds"]
    assert r1["exact"] is True and r1["included_ids"] == [0, 1]
    phases = {e["phase"]: e for e in result["exchanges"]}
    assert phases["consistency"]["answered"] == 2 and phases["unmask"]["answered"] == 2


def test_in_memory_default_keeps_its_per_process_registry() -> None:
    assert isinstance(SecAgg(authenticated=True).registry, IdentityRegistry)
    assert isinstance(SecAggPlus().registry, IdentityRegistry)
    fixed = FixedIdentities({0: b"\x01" * 32, 1: b"\x02" * 32}, own=(0, b"\x03" * 32))
    with pytest.raises(ValueError, match="only its own"):
        fixed.private(1)
    with pytest.raises(ValueError, match="no public identity key"):
        fixed.ensure([0, 1, 2])


# ---------------------------------------------------------------- policy
def test_a_node_requiring_authenticated_mode_refuses_an_unauthenticated_job(tmp_path: Path) -> None:
    keys, roster_path, _, pol = _setup(tmp_path, require_authenticated=True)
    job = _sum_job(tmp_path, None, authenticated=False)
    for ctx in _contexts(tmp_path, job, keys, roster_path, pol).values():
        reply = _hello(ctx)
        assert reply.has_error() and "requires it" in reply.error.reason
    plain_policy = NodePolicy().save(tmp_path / "default.json")  # the default still runs unauthenticated jobs
    for ctx in _contexts(tmp_path, job, keys, roster_path, plain_policy).values():
        assert not _hello(ctx).has_error()


def test_an_authenticated_job_without_identity_files_names_the_fix(tmp_path: Path) -> None:
    _, _, roster, _ = _setup(tmp_path)
    ctx = node_context(tmp_path, 100, 0, N, _sum_job(tmp_path, roster).to_json())
    reply = _hello(ctx)
    assert reply.has_error() and "--identity-key" in reply.error.reason


def test_bad_authenticated_settings_are_refused_naming_the_fix(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from fl.cli.main import main
    from fl.runners.flower import JobError

    with pytest.raises(ValueError, match="roster_sha256"):
        NodePolicy(roster_sha256="abc")
    with pytest.raises(JobError, match="authenticated flag"):
        FlowerJob(task="sum", authenticated="yes")  # type: ignore[arg-type]
    with pytest.raises(JobError, match="not 'plain'"):
        from fl.runners.flower.job import sum_of

        sum_of(FlowerJob(task="sum", protocol="plain", authenticated=True))
    with pytest.raises(ValueError, match="has no secagg"):
        PrivacyConfig(spec="clip,noise", authenticated=True)
    base = ["flower", "--home", str(tmp_path / "h"), "run", "--insecure", "--task", "sum", "--privacy", "secagg+"]
    assert main([*base, "--authenticated"]) == 2  # refused before contacting anyone
    assert "needs --identity-roster" in capsys.readouterr().err
    _, roster_path, _, _ = _setup(tmp_path)
    assert main([*base, "--identity-roster", str(roster_path)]) == 2
    assert "add --authenticated" in capsys.readouterr().err


# ---------------------------------------------------------------- adversary: a server substituting keys
def _swap_key(roster: Roster, cid: int, tmp: Path) -> Roster:
    """The roster with client ``cid``'s public key replaced by one whose private key the server holds."""
    evil = Roster.assemble([make_identity(tmp / "evil", "evil")[1]]).clients[0].public_key
    clients = dict(roster.clients)
    clients[cid] = type(clients[cid])(site=clients[cid].site, public_key=evil)
    return Roster(clients)


def test_a_job_shipping_another_roster_is_refused_by_every_node(tmp_path: Path) -> None:
    keys, roster_path, roster, pol = _setup(tmp_path)
    job = _sum_job(tmp_path, _swap_key(roster, 2, tmp_path))
    contexts = _contexts(tmp_path, job, keys, roster_path, pol)
    for ctx in contexts.values():
        reply = _hello(ctx)
        assert reply.has_error() and "substituted identity keys" in reply.error.reason
    with pytest.raises(RuntimeError, match="substituted identity keys"):
        serve(InProcessGrid(contexts), job, Progress(Path(job.out)))  # type: ignore[arg-type]


def test_a_node_whose_roster_file_is_not_the_pinned_one_refuses(tmp_path: Path) -> None:
    """The pin guards the node's own copy: a roster file swapped on the node (with a job to match) is refused."""
    keys, _, roster, pol = _setup(tmp_path)
    swapped = _swap_key(roster, 2, tmp_path)
    path = swapped.save(tmp_path / "swapped-roster.json")
    job = _sum_job(tmp_path, swapped)
    for ctx in _contexts(tmp_path, job, keys, path, pol).values():
        reply = _hello(ctx)
        assert reply.has_error() and "not the one this node's policy pins" in reply.error.reason


def _rewrite_msgs(msg: Message, fn: Any) -> Message:
    """Apply ``fn`` to each protocol message the request carries (in place: the request keeps its ids)."""
    from secagg import wire

    rec = msg.content["privagg"]
    if "msgs" in rec:
        rec["msgs"] = [wire.dumps(fn(wire.loads(b))) for b in rec["msgs"]]
    return msg


@pytest.mark.parametrize("authenticated", [True, False])
def test_a_server_substituting_a_clients_advertised_keys_is_refused(tmp_path: Path, authenticated: bool) -> None:
    """The server relays its own keys for client 2 to the others, signed with a key it holds: refused by every
    honest node in authenticated mode (and, the control, silently accepted without it)."""
    import dataclasses

    from secagg._hazmat import kex, sign
    from secagg.masking._common import ADVERTISE_SIG_LABEL, advertise_payload
    from secagg.masking.messages import KeyDirectory

    keys, roster_path, roster, pol = _setup(tmp_path)
    job = _sum_job(tmp_path, roster if authenticated else None, rounds=1, authenticated=authenticated)
    evil = sign.generate_identity(os.urandom)

    def substitute(m: Any) -> Any:
        if not isinstance(m, KeyDirectory) or m.recipient == 2 or 2 not in m.ids:
            return m
        i = m.ids.index(2)
        c_pk, s_pk = kex.public_bytes(kex.generate_private(os.urandom)), kex.public_bytes(kex.generate_private(
            os.urandom))
        sig = sign.sign(evil, label=ADVERTISE_SIG_LABEL, payload=advertise_payload(m.session, m.round, 2, c_pk, s_pk,
                                                                                   m.b_commits[i]))
        def put(t: tuple[bytes, ...], v: bytes) -> tuple[bytes, ...]:
            return (*t[:i], v, *t[i + 1:])

        return dataclasses.replace(m, c_pks=put(m.c_pks, c_pk), s_pks=put(m.s_pks, s_pk),
                                   signatures=put(m.signatures, sig))

    replies: dict[int, list[Message]] = {}

    def record(req: Message, reply: Message) -> Message:
        replies.setdefault(req.metadata.dst_node_id, []).append(reply)
        return reply

    contexts = _contexts(tmp_path, job, keys, roster_path, pol)
    grid = InProcessGrid(contexts, {n: record for n in contexts},
                         rewrite=lambda node, msg: _rewrite_msgs(msg, substitute))
    result = serve(grid, job, Progress(Path(job.out)))  # type: ignore[arg-type]
    share_replies = {n: rs[2] for n, rs in replies.items()}  # hello, advertise (start), share
    refused = {n - 100 for n, r in share_replies.items()
               if r.has_error() and "carry no valid signature" in r.error.reason}
    if authenticated:
        assert refused == {0, 1}  # every honest node the substitution reached
        assert "exact" not in result["rounds"][0]  # no sum was released with the server's keys in it
    else:
        assert refused == set()  # the control: without identity keys the substitution goes unnoticed


# ---------------------------------------------------------------- adversary: split view
N_SPLIT, T_SPLIT, VICTIM = 4, 3, 0  # secagg, threshold 0.75: t = 3 of 4, proved bound min(2, 2t - n - 1) = 1
EVERYONE, WITHOUT = tuple(range(N_SPLIT)), tuple(c for c in range(N_SPLIT) if c != VICTIM)


def _split_view_over_flower(tmp: Path, colluders: set[int], view: dict[int, tuple[int, ...]]
                            ) -> tuple[int, int, list[tuple[int, str]]]:
    """The real ServerApp and ClientApps; the adversary rewrites each node's consistency check to the list
    ``view[node]`` (victim 0 alive, or dropped), holds back the honest unmask requests, signs both lists
    with the colluders' identity keys (it holds them), then asks each honest node for its shares per its
    view. Returns (shares of the victim's self-mask seed, of its mask key, honest refusals)."""
    from secagg import wire
    from secagg._hazmat import sign
    from secagg._hazmat.keyfile import read_identity_key
    from secagg.masking._common import SURVIVORS_SIG_LABEL, survivors_payload
    from secagg.masking.messages import ConsistencyCheck, UnmaskRequest, UnmaskResponse

    keys, roster_path, roster, pol = _setup(tmp, N_SPLIT)
    job = _sum_job(tmp, roster, clients=N_SPLIT, rounds=1, protocol="secagg", threshold=0.75)
    where: dict[int, tuple[bytes, int, int]] = {}

    def rewrite(node: int, msg: Message) -> Message:
        def split(m: Any) -> Any:
            if isinstance(m, ConsistencyCheck):
                where[m.recipient] = (m.session, m.round, int(msg.content["privagg"]["step"]))
                return type(m)(m.sender, m.recipient, m.session, m.round, view[m.recipient])
            if isinstance(m, UnmaskRequest):  # held back: a wrong step is refused before any state is touched
                msg.content["privagg"]["step"] = 999
            return m

        return _rewrite_msgs(msg, split)

    contexts = _contexts(tmp, job, keys, roster_path, pol)
    serve(InProcessGrid(contexts, rewrite=rewrite), job, Progress(Path(job.out)))  # type: ignore[arg-type]
    assert set(where) == set(range(N_SPLIT)), "the consistency round did not run over Flower"
    session, rnd, _ = where[0]
    sigs: dict[tuple[int, ...], dict[int, bytes]] = {EVERYONE: {}, WITHOUT: {}}
    for v in range(N_SPLIT):  # honest nodes signed their own view; colluders sign both
        key = sign.private_from_bytes(read_identity_key(keys[v])[0])
        for lst in (EVERYONE, WITHOUT) if v in colluders else (view[v],):
            sigs[lst][v] = sign.sign(key, label=SURVIVORS_SIG_LABEL, payload=survivors_payload(session, rnd, lst))
    b_shares = s_shares = len(colluders)  # each colluder hands over its shares of both of the victim's secrets
    refusals: list[tuple[int, str]] = []
    for cid in sorted(set(range(N_SPLIT)) - colluders):
        lst, signers = view[cid], tuple(sorted(sigs[view[cid]]))
        req = UnmaskRequest(-1, cid, session, rnd, lst, () if lst == EVERYONE else (VICTIM,), signers,
                            tuple(sigs[lst][v] for v in signers))
        fields = {"session": session, "round": rnd, "step": where[cid][2] + 1, "final": True,
                  "msgs": [wire.dumps(req)]}
        reply = deliver(instruction(100 + cid, "query.privagg_step", fields, message_id=f"u{cid}"),
                        contexts[100 + cid])
        if reply.has_error():
            refusals.append((cid, reply.error.reason))
            continue
        (resp,) = [wire.loads(b) for b in reply.content["privagg"]["msgs"]]
        assert isinstance(resp, UnmaskResponse)
        b_shares += VICTIM in resp.alive
        s_shares += VICTIM in resp.dropped
    return b_shares, s_shares, refusals


def test_a_split_view_at_the_proved_bound_is_caught_by_the_consistency_round_over_flower(tmp_path: Path) -> None:
    """c = 1 colluder (node 3): victim 0 alive for {0, 1}, dropped for {2}. Node 2 sees only 2 < t signatures on
    its list and refuses, so the server never holds t shares of the victim's mask key."""
    view = {0: EVERYONE, 1: EVERYONE, 2: WITHOUT, 3: WITHOUT}
    b, s, refusals = _split_view_over_flower(tmp_path, {3}, view)
    assert [c for c, _ in refusals] == [2] and f"fewer than t={T_SPLIT}" in refusals[0][1]
    assert b >= T_SPLIT and s < T_SPLIT  # the self-mask seed alone does not unmask the victim's input


def test_a_split_view_with_one_colluder_above_the_bound_succeeds_over_flower(tmp_path: Path) -> None:
    """The control (the bound is tight): c = 2 colluders {2, 3}, victim alive for {0}, dropped for {1}: every
    list carries t signatures, nobody refuses, and the server holds t shares of both of the victim's secrets."""
    view = {0: EVERYONE, 1: WITHOUT, 2: EVERYONE, 3: EVERYONE}
    b, s, refusals = _split_view_over_flower(tmp_path, {2, 3}, view)
    assert refusals == [] and b >= T_SPLIT and s >= T_SPLIT


# ---------------------------------------------------------------- real processes
@pytest.mark.flower
@pytest.mark.slow
def test_privagg_flower_local_authenticated_runs_over_tls_processes(tmp_path: Path) -> None:
    """``privagg flower local --authenticated``: 3 SuperNodes (TLS), each with only its own identity key and
    the pinned roster; the secure sums are exact and every round has the consistency phase."""
    from fl.cli.main import main

    home, out = tmp_path / "home", tmp_path / "out"
    rc = main(["flower", "--home", str(home), "local", "--authenticated", "--task", "sum", "--privacy", "secagg+",
               "--clients", "3", "--rounds", "2", "--threshold", "0.7", "--size", "1000", "--out", str(out),
               "--join-timeout", "60", "--start-timeout", "60", "--phase-timeout", "30", "--timeout", "240"])
    assert rc == 0
    result = json.loads((out / "result.json").read_text())
    assert [(r["exact"], r["included_ids"]) for r in result["rounds"]] == [(True, [0, 1, 2])] * 2
    for rnd in (1, 2):  # the CLI runs a sum's rounds in flight: each round's own phases, in order
        phases = [e["phase"] for e in result["exchanges"] if e["round"] == rnd]
        assert phases == ["advertise", "share", "masked", "consistency", "unmask"]
    assert result["job"]["rounds_in_flight"] == 4 and len({e["bundle"] for e in result["exchanges"]}) == 2 + 4
    ident = home.parent / "local" / "identity"
    roster = Roster.load(ident / "roster.json")
    assert result["job"]["roster"] == roster.to_dict() and result["job"]["authenticated"] is True
    assert NodePolicy.load(home.parent / "local" / "policy.json").roster_sha256 == roster.fingerprint()
    assert all(stat.S_IMODE(os.stat(ident / f"node{i}.identity.key").st_mode) == 0o600 for i in range(3))
    assert "identity.key" not in json.dumps(result["job"])  # the job names no private key file
    assert "https://127.0.0.1" in (home.parent / "local" / "logs" / "superlink.log").read_text()  # TLS, loopback
