"""``privagg flower ...``: start the parts of a Flower federation that runs our own secure aggregation.

``certs`` makes a throw-away CA and server certificate for local TLS tests; ``superlink`` and
``supernode`` start Flower's processes (TLS unless ``--insecure``, which outside loopback also needs
``--insecure-i-know``); the SuperLink lets only registered SuperNodes join (``register`` makes a site's
key pair and registers its public key); ``policy`` writes a node policy file (what a SuperNode accepts
from a job, :class:`fl.runners.flower.NodePolicy`); ``supernode --data CSV --name SITE`` gives a node its own
data (:mod:`fl.runners.flower.site`); ``paillier-keygen`` makes the Paillier key holder's key pair ONCE on
its machine, and ``supernode --key-holder --paillier-key DIR/key.json`` starts that key holder (its own node:
the aggregator never holds the private key; :mod:`fl.runners.flower.keyholder`); ``identity`` makes a site's
identity key for authenticated SecAgg and ``roster`` assembles the consortium's roster of public keys
(:mod:`fl.runners.flower.identity`); ``run`` submits a training (the ``privagg train`` flags) or a secure-sum
job and follows it; ``local`` starts a SuperLink and N SuperNodes on this host, runs a job and stops them.
Flower's configuration lives in ``--home``
(``FLWR_HOME``, default ``out/flower/home``), never in ``~/.flwr``; telemetry, update checks and runtime
dependency installation are off. Flower itself is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

DEFAULT_HOME = Path("out/flower/home")


def _partition(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--partition takes I/N (e.g. 0/3), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--partition I/N needs 0 <= I < N, got {text!r}")
    return i, n


def _tls_args(p: argparse.ArgumentParser, *, server: bool) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    if server:
        g.add_argument("--certs", type=Path, metavar="DIR",
                       help="serve TLS with DIR/server.pem, DIR/server.key and DIR/ca.pem (`privagg flower certs`)")
    else:
        g.add_argument("--ca", type=Path, metavar="PEM", help="CA certificate that signed the SuperLink's certificate")
        g.add_argument("--certs", type=Path, metavar="DIR",
                       help="DIR/ca.pem verifies the SuperLink; DIR/server.* also put the local Runtime API under TLS")
    g.add_argument("--insecure", action="store_true", help="no TLS (loopback only, unless --insecure-i-know)")
    _insecure_i_know(p)


def _insecure_i_know(p: Any) -> None:
    p.add_argument("--insecure-i-know", action="store_true",
                   help="allow --insecure for an address outside loopback: protocol messages then have no "
                        "integrity protection (SecAgg's unauthenticated modes rely on TLS for it)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``flower`` sub-commands."""
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME,
                        help="Flower's config directory (FLWR_HOME; default: %(default)s)")
    sub = parser.add_subparsers(dest="flower_command", metavar="PART", required=True)
    _add_certs_parser(sub)
    _add_superlink_parser(sub)
    _add_register_parser(sub)
    _add_policy_parser(sub)
    _add_identity_parsers(sub)
    _add_supernode_parser(sub)
    _add_keygen_parser(sub)
    _add_job_parsers(sub)


def _add_certs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``flower certs``: a throw-away CA and server certificate for local TLS tests."""
    p = sub.add_parser("certs", help="make a throw-away CA + server certificate for local TLS tests")
    p.add_argument("--out", type=Path, default=Path("out/flower/certs"), help="directory (default: %(default)s)")
    p.add_argument("--host", action="append", dest="hosts",
                   help="IP or DNS name the certificate is valid for (repeat; default: 127.0.0.1 and localhost)")
    p.add_argument("--days", type=int, default=7, help="validity in days (default: %(default)s)")


def _add_superlink_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``flower superlink``: where the SuperLink serves, whether SuperNodes must be registered, TLS."""
    p = sub.add_parser("superlink", help="start the SuperLink (the server side's entry point)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="the one HTTP(S) port of Flower 1.41+ (default: %(default)s)")
    p.add_argument("--no-supernode-auth", action="store_true",
                   help="let ANY SuperNode join (default: only those registered with `privagg flower register`; "
                        "Flower needs TLS for that)")
    _tls_args(p, server=True)


def _add_register_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``flower register``: a site's SuperNode key pair and the SuperLink to register its public key with."""
    p = sub.add_parser("register", help="make a site's SuperNode key pair (if missing) and register its public key")
    p.add_argument("--name", required=True, help="the site's name (keys: DIR/NAME.key, DIR/NAME.pub)")
    p.add_argument("--keys", type=Path, default=Path("out/flower/keys"),
                   help="directory for the key pair (default: %(default)s); the private key stays on the site")
    p.add_argument("--public-key", type=Path,
                   help="register this existing public key instead (what a site sent the SuperLink operator)")
    p.add_argument("--superlink", default="127.0.0.1:8000", help="SuperLink address HOST:PORT (default: %(default)s)")
    tls = p.add_mutually_exclusive_group(required=True)
    tls.add_argument("--ca", type=Path, metavar="PEM", help="CA certificate that signed the SuperLink's certificate")
    tls.add_argument("--insecure", action="store_true", help="no TLS (loopback only)")
    _insecure_i_know(p)


def _add_policy_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``flower policy``: the node policy file, i.e. what a SuperNode accepts from a job."""
    p = sub.add_parser("policy", help="write a node policy file: what this SuperNode accepts from a job")
    p.add_argument("--out", type=Path, required=True, help="policy file to write (JSON)")
    p.add_argument("--allow-plain", action="store_true", help="also run the plain sum (public test data only)")
    p.add_argument("--min-threshold", type=float, default=0.5, help="smallest t/n accepted (default: %(default)s)")
    p.add_argument("--min-clients", type=int, default=2, help="smallest planned cohort (default: %(default)s)")
    p.add_argument("--min-security-bits", type=float, default=40.0,
                   help="SecAgg+ on a sparse graph: the statistical security its (k, t) must keep under the "
                        "assumed fractions below (default: %(default)s)")
    p.add_argument("--assumed-corrupt", type=float, default=0.1,
                   help="fraction of clients this node assumes collude with the server (default: %(default)s)")
    p.add_argument("--assumed-dropout", type=float, default=0.1,
                   help="fraction of clients this node assumes drop out per round (default: %(default)s)")
    p.add_argument("--min-noise-multiplier", type=float,
                   help="require DP noise added on this node (dnoise or dp-sgd) with at least this multiplier")
    p.add_argument("--max-epsilon", type=float, help="require a target epsilon no larger than this")
    p.add_argument("--max-clip", type=float, help="require updates clipped to at most this L2 norm")
    p.add_argument("--trust-app", action="append", default=[], metavar="SHA256",
                   help="also run the Flower app bundle with this SHA-256 (repeat)")
    p.add_argument("--paillier-key", type=Path, metavar="PUBLIC_JSON",
                   help="also run paillier, encrypting only to this key holder's public key (its fingerprint is "
                        "pinned; a job naming another key is refused)")
    p.add_argument("--min-summands", type=int, default=2,
                   help="(key holder) decrypt no sum of fewer clients (default: %(default)s)")
    p.add_argument("--roster", type=Path, metavar="JSON",
                   help="pin this identity roster (`privagg flower roster`): a job with another roster is refused")
    p.add_argument("--require-authenticated", action="store_true",
                   help="run only authenticated SecAgg/SecAgg+ (identity keys, consistency round)")


def _add_keygen_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``flower paillier-keygen``: the key holder's Paillier key pair, made once on its own machine."""
    p = sub.add_parser("paillier-keygen", help="make the Paillier key holder's key pair (once, on its machine)")
    p.add_argument("--out", type=Path, required=True,
                   help="directory: DIR/key.json (private, mode 0600, stays here) and DIR/public.json (hand it to "
                        "the operator and the sites)")
    p.add_argument("--bits", type=int, default=2048, help="modulus bits (2048: 112-bit security; default: %(default)s)")


def _add_identity_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``flower identity`` (a site's identity key pair) and ``flower roster`` (the consortium's public keys)."""
    p = sub.add_parser("identity", help="make this site's Ed25519 identity key for authenticated SecAgg")
    p.add_argument("--name", required=True, help="the site's name (files: DIR/NAME.identity.key, .identity.json)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="directory; the private key (mode 0600) stays on the site, the .json goes to the roster")
    p = sub.add_parser("roster", help="assemble roster.json from the sites' public identity files")
    p.add_argument("--out", type=Path, required=True, metavar="JSON", help="roster file to write")
    p.add_argument("public", nargs="+", type=Path, metavar="SITE.identity.json",
                   help="the sites' public identity files, in client-id order (the first is partition 0)")


def _add_supernode_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``flower supernode``: one client's SuperNode, its partition, data, policy, key and TLS."""
    p = sub.add_parser("supernode", help="start one client's SuperNode (partition I of N), or the key holder")
    p.add_argument("--partition", type=_partition, metavar="I/N", help="this client's id / clients")
    p.add_argument("--key-holder", action="store_true",
                   help="this node is the Paillier key holder (no partition): it only decrypts sums, of at least its "
                        "policy's min_summands clients")
    p.add_argument("--paillier-key", type=Path, metavar="KEY_JSON",
                   help="the key holder's private key (`privagg flower paillier-keygen`; mode 0600)")
    p.add_argument("--superlink", default="127.0.0.1:8000", help="SuperLink address HOST:PORT (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="local Runtime API address (default: %(default)s)")
    p.add_argument("--port", type=int, default=9094,
                   help="local Runtime API port; give each SuperNode on one host its own (default: %(default)s)")
    p.add_argument("--state-key", type=Path,
                   help="file with the key that seals this node's protocol state (default: a fresh one in --home)")
    p.add_argument("--fleet-poll", type=float, default=0.1,
                   help="seconds between polls of the SuperLink when idle (Flower's own: 3) (default: %(default)s)")
    p.add_argument("--stock", action="store_true",
                   help="Flower's SuperNode loop unchanged (3 s idle polls, one new interpreter per message); "
                        "the app pin still applies")
    p.add_argument("--policy", type=Path, metavar="JSON",
                   help="this node's policy (`privagg flower policy`); default: secagg/secagg+ only, t >= n/2, "
                        ">= 2 clients, no seeded randomness, only the installed privagg app")
    p.add_argument("--auth-key", type=Path, metavar="KEY",
                   help="this site's private key registered with the SuperLink (`privagg flower register`)")
    p.add_argument("--data", type=Path, metavar="CSV",
                   help="this site's own data (a CSV with a header; train jobs train on it); the node never loads the "
                        "bundled set, and a run whose sites' columns differ is refused at its start")
    p.add_argument("--name", metavar="SITE", help="this site's name (default: the CSV's file name without .csv)")
    p.add_argument("--identity-key", type=Path, metavar="KEY",
                   help="this site's private identity key (`privagg flower identity`), for authenticated SecAgg")
    p.add_argument("--identity-roster", type=Path, metavar="JSON",
                   help="the consortium's roster (`privagg flower roster`), received out of band")
    _tls_args(p, server=False)


def _add_job_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``flower run`` and ``flower local``: the flags of ``privagg train`` plus a "flower" group."""
    from fl.cli.main import add_train_arguments

    for name, helptext in (("run", "submit a job to a running SuperLink and follow it"),
                           ("local", "start a SuperLink and N SuperNodes here, run a job, stop them")):
        p = sub.add_parser(name, help=helptext, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_train_arguments(p)
        g = p.add_argument_group("flower")
        _add_job_flags(g, name=name)


def _add_job_flags(g: argparse._ArgumentGroup, *, name: str) -> None:
    """The "flower" group of ``run`` (a remote SuperLink, its TLS) or ``local`` (SuperNodes started here)."""
    g.add_argument("--task", choices=["train", "sum"], default="train",
                   help="train: the federated training above; sum: a secure sum of --size public test words")
    g.add_argument("--size", type=int, default=100_000, help="vector length of --task sum")
    g.add_argument("--rounds-in-flight", type=int, choices=range(1, 5), metavar="K", default=None,
                   help="with secagg/secagg+: K rounds share each Flower exchange. A sum: R rounds take R+3 "
                        "exchanges at K=4 (4R at K=1). Training: K=2 agrees round r+1's keys during round r "
                        "(2R+2 exchanges; K is at most 2, a round needs the previous round's model). Default: "
                        "4 for such sums, 2 for such training, 1 otherwise")
    g.add_argument("--checkpoint-dir", type=Path,
                   help="the ServerApp checkpoints after every round into this directory")
    g.add_argument("--resume", type=Path, metavar="DIR", help="continue the Flower run checkpointed in DIR")
    g.add_argument("--out", type=Path, default=Path("out/flower/run"),
                   help="where the ServerApp writes result.json / params.npy (a path on the SuperLink host)")
    g.add_argument("--join-timeout", type=float, default=120.0, help="seconds to wait for the SuperNodes")
    g.add_argument("--start-timeout", type=float, default=300.0, help="seconds for local training (phase 0)")
    g.add_argument("--phase-timeout", type=float, default=60.0,
                   help="seconds per protocol phase; a SuperNode that misses it has dropped")
    g.add_argument("--poll", type=float, default=0.05,
                   help="seconds between pulls of replies; 0 = Flower's Grid.send_and_receive (3 s polls)")
    g.add_argument("--timeout", type=float, default=3600.0, help="give up waiting for the result after this")
    g.add_argument("--authenticated", action="store_true",
                   help="authenticated SecAgg/SecAgg+ (identity keys, signed messages, consistency round)"
                        + (": needs --identity-roster" if name == "run" else ": local nodes get fresh identities"))
    g.add_argument("--test-data", type=Path, metavar="CSV",
                   help="the server's own evaluation CSV when the SuperNodes hold their own data (default: no "
                        "server evaluation; the report says so)")
    if name == "run":
        g.add_argument("--own-data", action="store_true",
                       help="the SuperNodes hold their own CSVs (`supernode --data`): the launcher reads no data and "
                            "the preprocessing statistics are a round over the nodes")
        g.add_argument("--superlink", default="127.0.0.1:8000", help="SuperLink address HOST:PORT")
        g2 = g.add_mutually_exclusive_group(required=True)
        g2.add_argument("--ca", type=Path, metavar="PEM",
                        help="CA certificate that signed the SuperLink's certificate")
        g2.add_argument("--insecure", action="store_true", help="no TLS (loopback only)")
        _insecure_i_know(g)
        g.add_argument("--no-wait", action="store_true", help="submit and return (e.g. when --out is remote)")
        g.add_argument("--paillier-public-key", type=Path, metavar="PUBLIC_JSON",
                       help="paillier: the key holder's public key the job names (never its key.json)")
        g.add_argument("--identity-roster", type=Path, metavar="JSON",
                       help="the consortium's roster of public identity keys, shipped in the job (--authenticated)")
    else:
        g.add_argument("--insecure", action="store_true", help="no TLS (default: TLS with throw-away certificates)")
        g.add_argument("--stock", action="store_true",
                       help="Flower's SuperNodes unchanged (see `supernode --stock`)")
        g.add_argument("--node-policy", type=Path, metavar="JSON",
                       help="every local SuperNode's policy (`privagg flower policy`; default: the safe one)")
        g.add_argument("--paillier-key", type=Path, metavar="KEY_JSON",
                       help="paillier: the local key holder's private key (default: a throw-away pair in --home)")


def release_statistics(config: Any) -> dict[str, Any] | None:
    """The run's preprocessing statistics, released ONCE (one secure, DP when DP is on, sum over the sites)
    when the job is written; every Flower process then standardizes with this one release instead of
    computing (and releasing) its own."""
    from fl.data.sites import load_federated

    stats = load_federated(config).stats
    return stats.to_json() if stats is not None else None


def _job(args: argparse.Namespace) -> Any:
    from fl.cli.main import config_from_args
    from fl.runners.flower import FlowerJob

    config = config_from_args(args)
    if args.authenticated:
        import dataclasses

        config = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, authenticated=True))
    if config.early_stopping is not None:  # the Flower server runs every round: refuse, never ignore
        raise ValueError("--patience (early stopping) runs in memory only (privagg train); drop it for flower")
    common: dict[str, Any] = dict(
        out=str(args.out.resolve()), join_timeout=args.join_timeout, start_timeout=args.start_timeout,
        phase_timeout=args.phase_timeout, poll_interval=args.poll, paillier_public_key=_public_key_json(args),
        roster=_job_roster(args),
    )
    if args.task == "train":
        common["rounds_in_flight"] = _train_in_flight(args, config)
    if args.task == "train" and _own_data_run(args, config):
        return FlowerJob(task="train", config=_own_data_config(args, config).as_dict(), stats=None, **common)
    if args.task == "train":
        return _train_job(args, config, common)
    protocol = config.privacy.tokens()[-1] if config.privacy.tokens() else "plain"
    if protocol not in ("secagg", "secagg+", "paillier", "plain"):
        raise ValueError(f"--task sum runs secagg, secagg+, paillier or none (plain), not {config.privacy.spec!r}")
    in_flight = getattr(args, "rounds_in_flight", None) or (4 if protocol in ("secagg", "secagg+") else 1)
    return FlowerJob(task="sum", clients=config.clients, size=args.size, rounds=config.rounds, seed=config.seed,
                     protocol=protocol, threshold=config.privacy.cohort_threshold, authenticated=args.authenticated,
                     rounds_in_flight=in_flight, **common)


def _train_in_flight(args: argparse.Namespace, config: Any) -> int:
    """A training job's rounds in flight: 2 (key agreement ahead) for SecAgg/SecAgg+, else 1; asked-for
    values that cannot apply are refused, never ignored."""
    tokens = config.privacy.tokens()
    masked = bool(tokens) and tokens[-1] in ("secagg", "secagg+")
    asked = getattr(args, "rounds_in_flight", None)
    if asked is not None and asked > 2:
        raise ValueError("--rounds-in-flight for training is 1 or 2: a round starts from the model the previous "
                         "round's sum produces, so only its key agreement can run ahead")
    if asked == 2 and not masked:
        raise ValueError(f"--rounds-in-flight 2 is for secagg/secagg+ training, not {config.privacy.spec!r}")
    return asked if asked is not None else (2 if masked else 1)


def _job_roster(args: argparse.Namespace) -> dict[str, Any] | None:
    """The roster of public keys an authenticated ``run`` ships (``local`` nodes get the cluster's own)."""
    path = getattr(args, "identity_roster", None)
    if path is None:
        if args.authenticated and args.flower_command == "run":
            raise ValueError("--authenticated needs --identity-roster roster.json (the one every node pins)")
        return None
    if not args.authenticated:
        raise ValueError("--identity-roster is for --authenticated runs; add --authenticated or drop it")
    from fl.runners.flower.identity import Roster

    return Roster.load(path).to_dict()


def _train_job(args: argparse.Namespace, config: Any, common: dict[str, Any]) -> Any:
    """A train job; with ``--checkpoint-dir`` the ServerApp saves every round, ``--resume DIR`` continues.

    A resumed job keeps the checkpointed job's id (the nodes' record of released rounds is per job id)
    and its ONE statistics release: nothing is summed (or charged) again.
    """
    from fl.runners.flower import FlowerJob
    from fl.training.server import CHECKPOINT, saved_statistics

    if args.resume is not None:
        ckpt = args.resume.resolve()
        if not (ckpt / CHECKPOINT).is_file():
            raise ValueError(f"no checkpoint in {ckpt}: run once with --checkpoint-dir {ckpt} (the ServerApp saves "
                             "after every round)")
        stats = saved_statistics(ckpt)
        job_id = _checkpointed_job_id(ckpt)
        return FlowerJob(task="train", config=config.as_dict(), stats=stats.to_json() if stats else None,
                         checkpoint=str(ckpt), resume=True, job_id=job_id, **common)
    job_id = os.urandom(8).hex()  # names the job to the nodes; not a secret
    ckpt = args.checkpoint_dir.resolve() if args.checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / JOB_ID_FILE).write_text(json.dumps({"job_id": job_id}))
    return FlowerJob(task="train", config=config.as_dict(), stats=release_statistics(config),
                     checkpoint=str(ckpt) if ckpt else None, job_id=job_id, **common)


JOB_ID_FILE = "flower-job.json"
"""Written beside a Flower run's checkpoint: the job id a resume must keep."""


def _checkpointed_job_id(ckpt: Path) -> str:
    try:
        job_id = json.loads((ckpt / JOB_ID_FILE).read_text())["job_id"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{ckpt} holds no Flower job id ({JOB_ID_FILE}: {exc}); resume a directory written by "
                         "privagg flower run/local --checkpoint-dir") from exc
    if not isinstance(job_id, str) or not job_id:
        raise ValueError(f"{ckpt / JOB_ID_FILE} has no job id; resume a directory written by --checkpoint-dir")
    return job_id


def _public_key_json(args: argparse.Namespace) -> str | None:
    """The key holder's public key JSON for the job (``run --paillier-public-key``; ``local``: of its key)."""
    from fl.runners.flower.keyholder import read_private_key, read_public_key

    if getattr(args, "paillier_public_key", None) is not None:
        return read_public_key(args.paillier_public_key).to_json()
    if getattr(args, "paillier_key", None) is not None and args.flower_command == "local":
        return read_private_key(args.paillier_key).public.to_json()
    return None


def _own_data_run(args: argparse.Namespace, config: Any) -> bool:
    """Whether the SuperNodes train on their own CSVs (``local --site``/``--sites``, ``run --own-data``)."""
    if args.flower_command == "run" and (config.sites or config.sites_dir):
        raise ValueError("--site/--sites name files on this host; over `flower run` every SuperNode names its own "
                         "(`privagg flower supernode --data CSV --name SITE`): pass --own-data instead")
    return bool(config.sites or config.sites_dir or getattr(args, "own_data", False))


def local_sites(config: Any) -> list[tuple[str, Path]]:
    """``(site name, CSV)`` per local SuperNode from ``--site NAME=PATH`` / ``--sites DIR`` (no file is read)."""
    pairs = [(str(n), Path(p).resolve()) for n, p in config.sites]
    if config.sites_dir:
        pairs += [(p.stem, p.resolve()) for p in sorted(Path(config.sites_dir).glob("*.csv"))]
    missing = [str(p) for _, p in pairs if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"site CSV(s) {missing} not found; pass --site NAME=PATH with existing files")
    return pairs


def _own_data_config(args: argparse.Namespace, config: Any) -> Any:
    """The job's config of an own-data run: no path of any site, one client per node, the server's test CSV."""
    from dataclasses import replace

    test = args.test_data or (config.test_site.partition("=")[2] if config.test_site and "=" in config.test_site
                              else config.test_site)
    clients = len(local_sites(config)) if args.flower_command == "local" else config.clients
    if config.target is None:
        raise ValueError("name the label column of the sites' CSVs with --target COLUMN")
    return replace(config, sites=(), sites_dir=None, clients=clients,
                   test_site=str(Path(test).resolve()) if test else None)


def _follow(out: Path, *, timeout: float) -> dict[str, Any]:
    """Print the ServerApp's progress lines as they appear; return ``result.json``."""
    seen = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out / "progress.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        for line in lines[seen:]:
            ev = json.loads(line)
            if ev.get("event") == "joined":
                print(f"joined: {len(ev['nodes'])} SuperNodes in {ev['seconds']:.1f}s")
            elif ev.get("event") == "round" and ev.get("statistics"):
                print("round 0: the preprocessing statistics, summed over the sites' own data")
            elif ev.get("event") == "phase":
                print(f"  round {ev['round']} {ev['phase']:<10} answered {len(ev['answered'])}/{len(ev['sent'])}")
            elif ev.get("event") == "round_done":
                parts = [f"round {ev['round']} done: clients {ev.get('included', 0)}/{ev['planned']}"]
                if ev.get("included_sites"):
                    parts[0] += f" ({', '.join(ev['included_sites'])})"
                for key in ("accuracy", "epsilon", "exact", "seconds"):
                    if key in ev:
                        parts.append(f"{key} {ev[key]:.4g}" if isinstance(ev[key], float) else f"{key} {ev[key]}")
                print(" | ".join(parts))
        seen = len(lines)
        if (out / "result.json").is_file():
            return dict(json.loads((out / "result.json").read_text()))
        if (out / "error.json").is_file():
            raise RuntimeError(f"the ServerApp failed: {json.loads((out / 'error.json').read_text())['error']}")
        time.sleep(0.2)
    raise TimeoutError(f"no result in {out} after {timeout:g}s")


def _exec(cmd: list[str], env: dict[str, str]) -> int:
    print("exec:", " ".join(cmd), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def run(args: argparse.Namespace) -> int:
    """Dispatch ``privagg flower PART``."""
    try:
        from fl.runners import flower as fw
    except ImportError as exc:
        print(f"privagg flower: Flower is not installed ({exc}); pip install 'privagg[flower]'", file=sys.stderr)
        return 2
    home: Path = args.home.resolve()
    env = fw.flower_env(home)
    try:
        return _dispatch(fw, args, home, env)
    except (fw.InsecureTransportError, fw.JobError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"privagg flower {args.flower_command}: {exc}", file=sys.stderr)
        return 2


def _superlink(fw: Any, args: argparse.Namespace, env: dict[str, str]) -> int:
    if args.insecure and not args.no_supernode_auth:
        raise ValueError("SuperNode authentication needs TLS: give --certs DIR, or --no-supernode-auth for an open "
                         "(test) SuperLink")
    certs = None if args.insecure else fw.CertPaths.in_dir(args.certs)
    return _exec(fw.superlink_command(host=args.host, port=args.port, certs=certs,
                                      allow_insecure_remote=args.insecure_i_know,
                                      supernode_auth=not args.no_supernode_auth), env)


def _key_holder_key(args: argparse.Namespace) -> Path | None:
    """``supernode --key-holder --paillier-key KEY``: the key holder's private key, checked now (else None)."""
    if (args.partition is None) == (not args.key_holder):
        raise ValueError("give --partition I/N (a client) or --key-holder --paillier-key DIR/key.json (the key holder)")
    if not args.key_holder:
        if args.paillier_key is not None:
            raise ValueError("--paillier-key is the key holder's private key: give --key-holder too")
        return None
    if args.paillier_key is None:
        raise ValueError("--key-holder needs --paillier-key DIR/key.json (`privagg flower paillier-keygen --out DIR`)")
    if args.data is not None:
        raise ValueError("the key holder holds no data: drop --data")
    from fl.runners.flower.keyholder import read_private_key

    read_private_key(args.paillier_key)  # refuse a missing, unreadable or world-readable key at node start
    return Path(args.paillier_key).resolve()


def _supernode(fw: Any, args: argparse.Namespace, home: Path, env: dict[str, str]) -> int:
    holder = _key_holder_key(args)
    i = args.partition[0] if holder is None else "keyholder"
    key = args.state_key or fw.make_state_key(home / "keys" / f"supernode-{i}-{os.getpid()}.key")
    if not key.is_file():
        raise FileNotFoundError(f"--state-key {key} does not exist")
    policy = None
    if args.policy is not None:
        fw.NodePolicy.load(args.policy)  # fail here, not at the first job, on a bad file
        policy = args.policy.resolve()
    if args.auth_key is not None and not args.auth_key.is_file():
        raise FileNotFoundError(f"--auth-key {args.auth_key} does not exist; make it with `privagg flower register`")
    data = None
    if args.data is not None:
        from fl.runners.flower.site import read_header

        read_header(args.data)  # refuse at node start, not at the first job, a file that is not a CSV with a header
        data = args.data.resolve()
    elif args.name is not None:
        raise ValueError("--name names the site of --data CSV; give --data too")
    identity = _identity_files(args, args.partition[0], policy) if holder is None else {}
    certs = fw.CertPaths.in_dir(args.certs) if getattr(args, "certs", None) else None
    ca = None if args.insecure else (args.ca if args.ca else None)
    cmd_line = fw.supernode_command(superlink=args.superlink, partition=args.partition, state_key=key.resolve(),
                                    key_holder=holder,
                                    port=args.port, host=args.host, certs=certs, ca=ca,
                                    fleet_poll=0.0 if args.stock else args.fleet_poll, policy=policy,
                                    auth_key=args.auth_key.resolve() if args.auth_key else None,
                                    allow_insecure_remote=args.insecure_i_know, data=data, site=args.name,
                                    **identity)
    return _exec(cmd_line, env)


def _identity_files(args: argparse.Namespace, cid: int, policy: Path | None) -> dict[str, Path]:
    """Refuse to start a node whose identity key does not match its roster entry (or its policy's pin)."""
    from fl.runners.flower.identity import Roster, check_identity
    from fl.runners.flower.policy import NodePolicy

    if args.identity_key is None and args.identity_roster is None:
        return {}
    if args.identity_key is None or args.identity_roster is None:
        raise ValueError("give --identity-key and --identity-roster together (own key, everyone's public keys)")
    pin = NodePolicy.load(policy).roster_sha256 if policy is not None else None
    check_identity(args.identity_key, Roster.load(args.identity_roster), cid, pin=pin)
    return {"identity_key": args.identity_key.resolve(), "identity_roster": args.identity_roster.resolve()}


def _identity(args: argparse.Namespace) -> int:
    from fl.runners.flower.identity import Roster, make_identity

    if args.flower_command == "identity":
        key, pub = make_identity(args.out, args.name)
        print(f"private identity key: {key} (mode 0600; stays on this site: supernode --identity-key {key})")
        print(f"public identity:      {pub} (send it to whoever assembles the consortium's roster)")
        return 0
    roster = Roster.assemble(args.public)
    roster.save(args.out)
    for cid, e in sorted(roster.clients.items()):
        print(f"  partition {cid}: {e.site}")
    print(f"roster: {args.out}  SHA-256 {roster.fingerprint()}")
    print(f"give every node this file out of band, and pin it: privagg flower policy --roster {args.out} ...")
    return 0


def _register(fw: Any, args: argparse.Namespace, home: Path, env: dict[str, str]) -> int:
    fw.write_connection(home, args.superlink, ca=None if args.insecure else args.ca.resolve(),
                        allow_insecure_remote=args.insecure_i_know)
    if args.public_key is not None:
        public = args.public_key
    else:
        private, public = fw.make_node_keys(args.keys, args.name)
        print(f"private key: {private} (stays on this site: privagg flower supernode --auth-key {private})")
    node_id = fw.register_node(env, public, name=args.name)
    print(f"registered {args.name} ({public}) as SuperNode {node_id}")
    return 0


def _policy(fw: Any, args: argparse.Namespace) -> int:
    protocols = ("secagg", "secagg+", "plain") if args.allow_plain else ("secagg", "secagg+")
    pin = None
    if args.paillier_key is not None:
        from fl.runners.flower.keyholder import read_public_key

        pin = read_public_key(args.paillier_key).fingerprint.hex()
        protocols = (*protocols, "paillier")
    from fl.runners.flower.identity import Roster

    roster_pin = Roster.load(args.roster).fingerprint() if args.roster is not None else None
    policy = fw.NodePolicy(protocols=protocols, min_threshold=args.min_threshold, min_clients=args.min_clients,
                           min_noise_multiplier=args.min_noise_multiplier, max_epsilon=args.max_epsilon,
                           max_clip=args.max_clip, trusted_app_hashes=tuple(args.trust_app),
                           paillier_key_fingerprint=pin, min_summands=args.min_summands,
                           require_authenticated=args.require_authenticated, roster_sha256=roster_pin,
                           min_security_bits=args.min_security_bits, assumed_corrupt=args.assumed_corrupt,
                           assumed_dropout=args.assumed_dropout)
    print(f"node policy: {policy.save(args.out)} (privagg flower supernode --policy {args.out})")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    """``flower paillier-keygen``: the key holder's key pair, once; says where each half goes."""
    from fl.runners.flower.keyholder import keygen

    private, public = keygen(args.out, bits=args.bits)
    print(f"private key: {private} (mode 0600; stays here: privagg flower supernode --key-holder --paillier-key "
          f"{private})\npublic key:  {public} (to the operator: --paillier-public-key; to each site: "
          f"privagg flower policy --paillier-key {public})")
    return 0


def _dispatch(fw: Any, args: argparse.Namespace, home: Path, env: dict[str, str]) -> int:
    cmd = args.flower_command
    if cmd == "certs":
        paths = fw.make_certificates(args.out, hosts=tuple(args.hosts or ("127.0.0.1", "localhost")), days=args.days)
        print(f"CA:          {paths.ca}\nserver cert: {paths.cert}\nserver key:  {paths.key}")
        print("throw-away certificates for local TLS tests only; use your organisation's PKI across sites")
        return 0
    if cmd == "superlink":
        return _superlink(fw, args, env)
    if cmd == "supernode":
        return _supernode(fw, args, home, env)
    if cmd == "register":
        return _register(fw, args, home, env)
    if cmd == "policy":
        return _policy(fw, args)
    if cmd == "paillier-keygen":
        return _keygen(args)
    if cmd == "local" and args.paillier_key is None and "paillier" in args.privacy.split(","):
        from fl.runners.flower.keyholder import keygen

        args.paillier_key = keygen(home.parent / "local" / f"keyholder-{os.getpid()}", bits=2048)[0]
        print(f"throw-away Paillier key holder key: {args.paillier_key}")
    if cmd in ("identity", "roster"):
        return _identity(args)
    job = _job(args)
    result = _submit_run(fw, args, home, env, job) if cmd == "run" else _run_local(fw, args, home, job)
    if isinstance(result, int):  # flwr run's exit code: it failed, or --no-wait
        return result
    if "params_file" in result:
        print(f"model: {result['params_file']}")
    if "evaluation" in result.get("report", {}):
        print(result["report"]["evaluation"])
    print(f"result: {Path(job.out) / 'result.json'}")
    return 0

def _submit_run(fw: Any, args: argparse.Namespace, home: Path, env: dict[str, str], job: Any) -> dict[str, Any] | int:
    """``flower run``: submit the job to the SuperLink and follow it (an exit code: not submitted, or --no-wait)."""
    fw.write_connection(home, args.superlink, ca=None if args.insecure else args.ca.resolve(),
                        allow_insecure_remote=args.insecure_i_know)
    out = Path(job.out)
    for name in ("result.json", "error.json", "progress.jsonl"):
        (out / name).unlink(missing_ok=True)
    app = fw.write_app(home / "apps" / f"job-{os.getpid()}", job)
    import subprocess

    from fl.runners.flower.processes import exe_path

    cp = subprocess.run([exe_path("flwr"), "run", str(app), fw.CONNECTION], env=env)
    if cp.returncode != 0 or args.no_wait:
        return cp.returncode
    return _follow(out, timeout=args.timeout)


def _run_local(fw: Any, args: argparse.Namespace, home: Path, job: Any) -> dict[str, Any]:
    """``flower local``: a SuperLink and the job's SuperNodes here (TLS unless --insecure), run, stop them."""
    n = job.num_clients
    policy = fw.NodePolicy.load(args.node_policy) if args.node_policy else None
    if policy is None and job.paillier_public_key is not None:  # the local nodes pin the local key holder
        from fl.runners.flower.keyholder import job_public_key

        policy = fw.NodePolicy(protocols=("secagg", "secagg+", "paillier"),
                               paillier_key_fingerprint=job_public_key(job).fingerprint.hex())
    from fl.cli.main import config_from_args

    sites = local_sites(config_from_args(args)) if job.task == "train" else []
    with fw.LocalCluster(home.parent / "local", n, tls=not args.insecure,
                         fleet_poll=0.0 if args.stock else 0.1, policy=policy, authenticated=args.authenticated,
                         key_holder=args.paillier_key if job.paillier_public_key else None,
                         sites=sites or None) as cluster:
        holder = " + the key holder" if cluster.key_holder is not None else ""
        print(f"SuperLink on {cluster.address} ({'insecure' if args.insecure else 'TLS'}), {n} SuperNodes{holder}; "
              f"logs in {cluster.logs}")
        cluster.submit(job)
        return _follow(Path(job.out), timeout=args.timeout)
