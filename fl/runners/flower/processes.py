"""Flower processes on one host: commands, environment, app files, :class:`LocalCluster`.

Shared by ``privagg flower`` and the tests. Flower's config lives in ``FLWR_HOME`` (never ``~/.flwr``);
telemetry, update checks and runtime dependency installation are switched off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl.runners.flower.certs import CertPaths, make_certificates, make_node_keys, refuse_insecure_remote
from fl.runners.flower.identity import job_authenticated, node_config_entries, provision_local
from fl.runners.flower.job import JOB_KEY, FlowerJob
from fl.runners.flower.policy import POLICY_FILE_KEY, NodePolicy
from fl.runners.flower.state import STATE_KEY_FILE, make_state_key

log = logging.getLogger(__name__)


DEFAULT_SUPERLINK_PORT = 8000
"""Flower 1.41 serves Fleet, Control and Runtime APIs over HTTP(S) on this one SuperLink port."""
DEFAULT_SUPERNODE_PORT = 9094
"""Each SuperNode opens its local Runtime API here; several nodes on one host need distinct ports."""

CONNECTION = "privagg"
"""Name of the SuperLink connection that :func:`write_connection` puts in ``FLWR_HOME/config.toml``."""


def flower_env(home: Path, base: Mapping[str, str] | None = None, *, task_poll: float = 0.1) -> dict[str, str]:
    """Environment for Flower processes: config in ``home``, no telemetry, update check or installs.

    ``task_poll``: how often a SuperNode's SuperExec looks for a new task (Flower's default is 1 s).
    """
    env = dict(os.environ if base is None else base)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(task_poll),
    )
    # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def exe_path(name: str) -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; install Flower with `pip install 'privagg[flower]'`")
    return found


def register_node(env: Mapping[str, str], public_key: Path, *, name: str | None = None) -> int:
    """``flwr supernode register``: let the SuperNode holding ``public_key``'s private key join; its node id.

    Runs against the connection :func:`write_connection` put in ``env["FLWR_HOME"]`` (the SuperLink's
    Control API). Only registered keys can connect to a SuperLink started with SuperNode authentication.
    """
    import subprocess

    cmd = [exe_path("flwr"), "supernode", "register", str(public_key), CONNECTION, "--format", "json"]
    if name:
        cmd += ["--name", name]
    cp = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=120)
    try:
        out = json.loads(cp.stdout.strip() or "{}")
    except ValueError:
        out = {}
    if cp.returncode != 0 or not out.get("success"):
        raise RuntimeError(f"registering {public_key} failed ({cp.returncode}): {cp.stdout.strip()} "
                           f"{cp.stderr.strip()}")
    return int(out["node-id"])


def superlink_command(*, host: str = "127.0.0.1", port: int = DEFAULT_SUPERLINK_PORT,
                      certs: CertPaths | None = None, allow_insecure_remote: bool = False,
                      supernode_auth: bool = False) -> list[str]:
    """``flower-superlink`` with TLS (``certs``) or ``--insecure`` (loopback only unless ``allow_insecure_remote``).

    ``supernode_auth``: only SuperNodes whose public keys were registered (``privagg flower register``)
    may connect (Flower's ``--enable-supernode-auth``).
    """
    cmd = [exe_path("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if certs is None:
        refuse_insecure_remote(host, what="serving on", allow=allow_insecure_remote)
        return [*cmd, "--insecure"]
    return [*cmd, "--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key),
            "--ssl-ca-certfile", str(certs.ca)]


def supernode_command(
    *, superlink: str, partition: tuple[int, int] | None, state_key: Path, port: int = DEFAULT_SUPERNODE_PORT,
    host: str = "127.0.0.1", certs: CertPaths | None = None, ca: Path | None = None, fleet_poll: float = 0.0,
    policy: Path | None = None, auth_key: Path | None = None, allow_insecure_remote: bool = False,
    data: Path | None = None, site: str | None = None, key_holder: Path | None = None,
    identity_key: Path | None = None, identity_roster: Path | None = None,
) -> list[str]:
    """``flower-supernode`` for client ``partition = (i, n)``, or the Paillier key holder (``key_holder``:
    its private key file; ``partition=None``): :mod:`fl.runners.flower.keyholder`.

    ``ca``: the CA that signed the SuperLink's certificate (TLS); ``certs`` also puts the node's local
    Runtime API (``host:port``) under TLS. Neither: ``--insecure``. The SuperNode always starts through
    :func:`supernode_main`, which pins the app it runs; ``fleet_poll > 0`` also polls the SuperLink
    every ``fleet_poll`` seconds when idle instead of Flower's fixed 3 s (and forks ClientApps from a
    warm process); ``fleet_poll = 0`` keeps Flower's stock loop.
    ``policy``: this node's policy file (:class:`NodePolicy`; the safe defaults without one).
    ``auth_key``: this node's private key for SuperNode authentication (``privagg flower register``).
    ``data``/``site``: this node's own CSV and site name (:mod:`fl.runners.flower.site`).
    ``identity_key``/``identity_roster``: this node's private identity key and the consortium's roster, for
    authenticated SecAgg (:mod:`fl.runners.flower.identity`; both or neither).
    Without TLS, a SuperLink or Runtime API address outside loopback is refused unless
    ``allow_insecure_remote``.
    """
    node_config = _node_role(partition, key_holder) + f' {STATE_KEY_FILE}="{state_key}"'
    if policy is not None:
        node_config += f' {POLICY_FILE_KEY}="{policy}"'
    if data is not None:
        node_config += f' data-path="{data}" site-name="{site or data.stem}"'
    node_config += node_config_entries(identity_key, identity_roster)
    head = [sys.executable, "-m", "fl.runners.flower", "supernode", str(max(0.0, fleet_poll))]
    cmd = [*head, "--superlink", superlink, "--host", host, "--port", str(port), "--node-config", node_config]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    root = ca if ca is not None else (certs.ca if certs is not None else None)
    if root is None:
        refuse_insecure_remote(superlink, what="connecting to the SuperLink at", allow=allow_insecure_remote)
    if certs is None:
        refuse_insecure_remote(host, what="serving the local Runtime API on", allow=allow_insecure_remote)
    if root is None:
        return [*cmd, "--insecure"]
    cmd += ["--root-certificates", str(root)]
    if certs is not None:
        cmd += ["--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key), "--ssl-ca-certfile", str(certs.ca)]
    return cmd


def _node_role(partition: tuple[int, int] | None, key_holder: Path | None) -> str:
    """The node-config entries of a client (its partition) or of the key holder (role and key file)."""
    if (partition is None) == (key_holder is None):
        raise ValueError("a SuperNode is either a client (--partition I/N) or the key holder (--key-holder)")
    if key_holder is not None:
        from fl.runners.flower.keyholder import KEY_FILE_KEY, KEY_HOLDER_ROLE, ROLE_KEY

        return f'{ROLE_KEY}="{KEY_HOLDER_ROLE}" {KEY_FILE_KEY}="{key_holder}"'
    assert partition is not None
    i, n = partition
    if not 0 <= i < n:
        raise ValueError(f"--partition I/N needs 0 <= I < N, got {i}/{n}")
    return f"partition-id={i} num-partitions={n}"


def write_connection(home: Path, address: str, *, ca: Path | None, allow_insecure_remote: bool = False) -> Path:
    """Write ``home/config.toml`` with one SuperLink connection named ``privagg`` (TLS when ``ca``).

    Without ``ca`` (plaintext) an address outside loopback is refused unless ``allow_insecure_remote``.
    """
    if ca is None:
        refuse_insecure_remote(address, what="submitting to the SuperLink at", allow=allow_insecure_remote)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{ca}"' if ca is not None else "insecure = true")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_app(directory: Path, job: FlowerJob) -> Path:
    """Write a Flower App (``pyproject.toml`` only) whose components are this module's apps."""
    directory.mkdir(parents=True, exist_ok=True)
    job_toml = json.dumps(job.to_json())  # a JSON string is a valid TOML basic string
    (directory / "pyproject.toml").write_text(
        "\n".join([
            "[build-system]",
            'requires = ["hatchling"]',
            'build-backend = "hatchling.build"',
            "",
            "[project]",
            'name = "privagg-flower"',
            'version = "1.0.0"',
            'description = "privagg secure aggregation over Flower"',
            'license = "Apache-2.0"',
            "dependencies = []",
            "",
            "[tool.flwr.app]",
            'publisher = "privagg"',
            "",
            "[tool.flwr.app.components]",
            'serverapp = "fl.runners.flower:server_app"',
            'clientapp = "fl.runners.flower:client_app"',
            "",
            "[tool.flwr.app.config]",
            f"{JOB_KEY} = {job_toml}",
            "",
        ])
    )
    return directory


class LocalCluster:
    """A SuperLink and ``n`` SuperNodes as processes on one host (tests, benchmarks, ``privagg flower local``).

    Each process is started in its own session (process group); :meth:`stop` signals exactly those
    groups, by the PIDs it started (SIGTERM, then SIGKILL after ``grace`` seconds), so Flower's helper
    processes (SuperExec, ServerApp, ClientApps) go with them. Use it as a context manager so the
    processes are stopped also when the body fails. ``authenticated``: each node gets its own identity
    key and the roster (``workdir/identity``), pinned in the nodes' policy; :meth:`submit` ships the
    roster's public keys with an authenticated job (:mod:`fl.runners.flower.identity`).
    """

    def __init__(self, workdir: Path, n: int, *, tls: bool = True, host: str = "127.0.0.1",
                 port: int | None = None, node_ports: Sequence[int] | None = None, task_poll: float = 0.1,
                 fleet_poll: float = 0.0, policy: NodePolicy | None = None, supernode_auth: bool = False,
                 sites: Sequence[tuple[str, Path]] | None = None, key_holder: Path | None = None,
                 authenticated: bool = False) -> None:
        if supernode_auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it on an insecure SuperLink)")
        self.workdir = workdir
        self.n = n
        self.tls = tls
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.node_ports = list(node_ports) if node_ports is not None else [free_port(host) for _ in range(n)]
        if len(self.node_ports) != n:
            raise ValueError(f"need {n} SuperNode ports, got {len(self.node_ports)}")
        self.sites = list(sites) if sites is not None else None  # (site name, CSV) of node i
        self.key_holder = key_holder  # the Paillier key holder's private key: one more node, never a client
        self.home = workdir / "flwr-home"
        self.env = flower_env(self.home, task_poll=task_poll)
        self.fleet_poll = fleet_poll
        self.policy = policy
        self.supernode_auth = supernode_auth
        self.certs: CertPaths | None = None
        self.superlink: Any = None
        self.nodes: dict[int, Any] = {}
        self.logs = workdir / "logs"
        self.authenticated = authenticated  # identity keys per node and a roster pinned in the nodes' policy
        self.roster: Any = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _spawn(self, name: str, cmd: list[str]) -> Any:
        import subprocess

        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("ab") as fh:
            return subprocess.Popen(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.workdir)

    def start(self, *, timeout: float = 90.0) -> LocalCluster:
        """Start everything and wait until the SuperLink and each SuperNode's local port accept connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.certs = make_certificates(self.workdir / "certs", hosts=(self.host, "localhost"))
        write_connection(self.home, self.address, ca=self.certs.ca if self.certs else None)
        if self.authenticated:
            self._provision_identities()
        self.superlink = self._spawn("superlink", superlink_command(host=self.host, port=self.port, certs=self.certs,
                                                                    supernode_auth=self.supernode_auth))
        wait_port(self.host, self.port, timeout, self.superlink, self.logs / "superlink.log")
        for i in range(self.n):
            self.start_node(i)
        if self.key_holder is not None:
            self.start_node(self.n)
        for i in self.nodes:
            wait_port(self.host, self.node_ports[i], timeout, self.nodes[i], self.logs / f"supernode{i}.log")
        return self

    def _provision_identities(self) -> None:
        """One identity key per node, the roster, and its SHA-256 pinned in the nodes' policy."""
        import dataclasses

        _, _, self.roster = provision_local(self.workdir / "identity", self.n)
        self.policy = dataclasses.replace(self.policy or NodePolicy(), roster_sha256=self.roster.fingerprint())

    def start_node(self, i: int, *, register: bool = True) -> Any:
        """Start SuperNode ``i`` (partition i of n; ``i = n`` with ``key_holder``: the key holder); with
        SuperNode auth, register its fresh key first unless ``register=False`` (an intruder: its key is
        unknown to the SuperLink)."""
        key = make_state_key(self.workdir / "keys" / f"node{i}.key")
        policy = self.policy.save(self.workdir / "policy.json") if self.policy is not None else None
        while len(self.node_ports) <= i:
            self.node_ports.append(free_port(self.host))
        auth_key = None
        if self.supernode_auth:
            auth_key, public = make_node_keys(self.workdir / "auth", f"node{i}")
            if register:
                register_node(self.env, public, name=f"node{i}")
        holder = self.key_holder if i == self.n and self.key_holder is not None else None
        ident_key, ident_roster = self._identity_files(i) if holder is None else (None, None)
        cmd = supernode_command(superlink=self.address, partition=None if holder else (i, max(self.n, i + 1)),
                                state_key=key, key_holder=holder,
                                port=self.node_ports[i], host=self.host, certs=self.certs, fleet_poll=self.fleet_poll,
                                policy=policy, auth_key=auth_key, site=self.sites[i][0] if self.sites and not holder
                                else None, data=self.sites[i][1] if self.sites and not holder else None,
                                identity_key=ident_key, identity_roster=ident_roster)
        self.nodes[i] = self._spawn(f"supernode{i}", cmd)
        return self.nodes[i]

    def _identity_files(self, i: int) -> tuple[Path | None, Path | None]:
        """Node ``i``'s identity key and the roster (``None, None`` without authenticated mode)."""
        if self.roster is None:
            return None, None
        ident = self.workdir / "identity"
        return ident / f"node{i}.identity.key", ident / "roster.json"

    def kill_node(self, i: int) -> None:
        """Kill SuperNode ``i`` and its helpers at once (SIGKILL to its process group): a crash."""
        import signal

        proc = self.nodes[i]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def run(self, job: FlowerJob, *, timeout: float) -> dict[str, Any]:
        """``flwr run`` the job, wait for the ServerApp's ``result.json``; raise with its error otherwise."""
        self.submit(job)
        return wait_result(Path(job.out), timeout=timeout, processes=[self.superlink])

    def submit(self, job: FlowerJob) -> Path:
        """``flwr run`` the job (returns at once); the ServerApp writes into ``job.out``.

        An authenticated job without a roster gets this cluster's (public keys only)."""
        if self.roster is not None and job_authenticated(job) and job.roster is None:
            import dataclasses

            job = dataclasses.replace(job, roster=self.roster.to_dict())
        out = Path(job.out)
        for name in ("result.json", "error.json", "progress.jsonl"):
            (out / name).unlink(missing_ok=True)
        self.submit_app(write_app(self.workdir / "app", job))
        return out

    def submit_app(self, app: Path) -> None:
        """``flwr run APP privagg`` against this cluster's SuperLink."""
        import subprocess

        cp = subprocess.run([exe_path("flwr"), "run", str(app), CONNECTION], env=self.env, capture_output=True,
                            text=True, timeout=180, cwd=self.workdir)
        if cp.returncode != 0:
            raise RuntimeError(f"flwr run failed ({cp.returncode}): {cp.stdout}\n{cp.stderr}")

    def stop(self, grace: float = 3.0) -> None:
        """Stop exactly the process groups this cluster started (SIGTERM, then SIGKILL)."""
        import signal
        import subprocess

        procs = [p for p in [*self.nodes.values(), self.superlink] if p is not None]
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in procs:  # the group may outlive its leader (helpers): kill whatever is left of it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            if p.poll() is None:
                p.wait(timeout=10)
        deadline = time.monotonic() + 10
        for p in procs:  # wait until every member of every group is gone (reaped)
            while group_alive(p.pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_result(out: Path, *, timeout: float, processes: Sequence[Any] = ()) -> dict[str, Any]:
    """Wait for the ServerApp's ``result.json`` in ``out``; raise on ``error.json``, a dead process or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "result.json").is_file():
            return dict(json.loads((out / "result.json").read_text()))
        if (out / "error.json").is_file():
            raise RuntimeError(f"the ServerApp failed: {json.loads((out / 'error.json').read_text())['error']}")
        for p in processes:
            if p.poll() is not None:
                raise RuntimeError(f"Flower process {p.pid} exited with {p.returncode} before the run finished")
        time.sleep(0.2)
    raise TimeoutError(f"no result in {out} after {timeout:g}s; see progress.jsonl there and the Flower logs")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float, proc: Any, logfile: Path) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = logfile.read_text()[-2000:] if logfile.is_file() else ""
            raise RuntimeError(f"Flower process exited with {proc.returncode} before opening {host}:{port}:\n{tail}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g}s; see {logfile}")
