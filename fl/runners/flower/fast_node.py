"""privagg's tuned SuperNode and SuperExec: the ONE module that patches Flower internals.

``privagg flower supernode`` starts :func:`supernode_main`; with ``poll > 0`` it shortens the SuperNode's
idle poll (Flower sleeps a fixed 3 s when the SuperLink has no message) and forks each ClientApp from a
warm process (:func:`superexec_main`, :class:`ForkExecutor`) instead of starting a fresh interpreter per
message. Both reach into Flower modules that are not public API, so they are applied only on the
Flower versions they were written and tested against (:data:`PATCHED_FLOWER`); on any other version, or
when an internal has moved, the node runs Flower's stock loop unchanged and logs a warning saying so.
The app pin (:mod:`fl.runners.flower.pin`) is NOT optional: without its hook the node refuses to start.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from fl.runners.flower.policy import NodePolicy
from fl.runners.flower.processes import DEFAULT_SUPERNODE_PORT

__all__ = ["PATCHED_FLOWER", "ForkExecutor", "patch_supported", "superexec_main", "supernode_main"]

log = logging.getLogger(__name__)

PATCHED_FLOWER = ((1, 41), (1, 42))
"""Flower (major, minor) releases whose internals the fast path was tested against (CI runs them)."""


def patch_supported(version: str | None = None) -> bool:
    """True when the installed (or given) Flower version is one the fast path was tested against."""
    if version is None:
        import flwr

        version = str(getattr(flwr, "__version__", ""))
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) in PATCHED_FLOWER


class _FastClock:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: sleeps at most ``poll`` seconds."""

    def __init__(self, poll: float) -> None:
        self.poll = poll

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.poll))


def _runtime_address(argv: Sequence[str]) -> tuple[str, bool, str | None]:
    """The SuperNode's local Runtime API address and TLS settings, read from its command line."""
    def opt(name: str, default: str | None) -> str | None:
        return argv[argv.index(name) + 1] if name in argv else default

    host, port = opt("--host", "127.0.0.1"), opt("--port", str(DEFAULT_SUPERNODE_PORT))
    ca = opt("--ssl-ca-certfile", None)
    tls = "--ssl-certfile" in argv
    return f"{host}:{port}", not tls, ca if tls else None


def _node_policy_from_argv(argv: Sequence[str]) -> NodePolicy:
    """The node policy named in ``--node-config`` of a SuperNode command line (the defaults if none)."""
    from flwr.common.config import parse_config_args

    config = parse_config_args([argv[argv.index("--node-config") + 1]]) if "--node-config" in argv else {}
    return NodePolicy.from_node_config(config)


def supernode_main(poll: float, argv: Sequence[str], *, fork: bool = True) -> int:
    """``flower-supernode ARGV`` with the app pin, tuned for short protocol phases when ``poll > 0``.

    * App pin (always): the node runs only the installed privagg ClientApp, or apps its policy trusts
      (:mod:`fl.runners.flower.pin`). If this Flower version has no hook for it, the node refuses to
      start (:class:`~fl.runners.flower.pin.PinUnavailableError`) rather than run unpinned.
    * ``poll <= 0``: nothing else changes (Flower's stock loop and one interpreter per message).

    * Idle poll: Flower's SuperNode sleeps a fixed 3 s whenever the SuperLink has no message for it, so
      each phase waits on average 1.5 s (the slowest of n nodes up to 3 s) before a node sees its
      message. Its loop reads ``time.sleep`` from its module; that is swapped for one capped at
      ``poll`` seconds.
    * ``fork``: Flower starts a fresh ``flwr-clientapp`` interpreter per message (imports of Flower,
      numpy, torch: seconds each time). Here the SuperNode runs with ``--isolation process`` next to
      :func:`superexec_main`, a SuperExec that forks each ClientApp from a process that has already
      imported everything, then runs Flower's own ``flwr-clientapp`` code in the child.

    On a Flower version outside :data:`PATCHED_FLOWER`, or if a release moves the poll internals, the
    SuperNode runs Flower's stock loop unchanged, with a warning.
    """
    from fl.runners.flower.pin import install_app_pin

    argv = list(argv)
    install_app_pin(_node_policy_from_argv(argv))
    if poll > 0 and not patch_supported():
        log.warning("the fast SuperNode path was tested on Flower %s only, not on the installed Flower; running "
                    "Flower's stock SuperNode loop (3 s idle poll, one interpreter per message)",
                    ", ".join(f"{a}.{b}" for a, b in PATCHED_FLOWER))
        poll = 0.0
    if poll > 0 and _shorten_poll(poll) and fork and "--isolation" not in argv:
        _start_fork_superexec(argv)
        argv += ["--isolation", "process"]
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
    return 0


def _shorten_poll(poll: float) -> bool:
    """Cap the SuperNode loop's sleeps at ``poll`` seconds; False (with a warning) if the loop has moved."""
    try:
        import flwr.supernode.start_client_internal as sci
    except ImportError:
        log.warning("this Flower version has no flwr.supernode.start_client_internal; running it unchanged")
        return False
    if getattr(sci, "time", None) is not time:
        log.warning("this Flower version has no SuperNode poll loop to shorten; running it unchanged")
        return False
    sci.__dict__["time"] = _FastClock(poll)
    return True


def _start_fork_superexec(argv: Sequence[str]) -> None:
    """Start :func:`superexec_main` beside the SuperNode, on its Runtime API (same process group)."""
    import subprocess

    address, insecure, ca = _runtime_address(argv)
    cmd = [sys.executable, "-m", "fl.runners.flower", "superexec", "--runtime-api-address", address,
           "--parent-pid", str(os.getpid())]
    cmd += ["--insecure"] if insecure else (["--root-certificates", ca] if ca else [])
    subprocess.Popen(cmd)  # same process group: stopped with the SuperNode


class ForkExecutor:
    """A SuperExec executor that forks a warm process per ClientApp task instead of exec'ing a new one."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self._fallback = SubprocessExecutor()
        self._children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types: Any, **kw: Any) -> Any:
        return self._fallback.get_eligible_capacity(supported_task_types, **kw)

    def wait_for_capacity(self, *a: Any, **kw: Any) -> None:
        self._fallback.wait_for_capacity(*a, **kw)

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        args = ["flwr-clientapp", "--runtime-api-address", spec.runtime_api_address, "--token", spec.token]
        if spec.insecure:
            args.append("--insecure")
        elif spec.root_certificates_path is not None:
            args += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            args += ["--parent-pid", str(spec.parent_pid)]
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # child: Flower's own ClientApp runner, then leave without touching the parent's state
            code = 1
            try:
                from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

                sys.argv = args
                flwr_clientapp()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("ClientApp task failed")
            finally:
                log.info("forked ClientApp task finished in %.3fs (exit %s)", time.perf_counter() - t0, code)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self._children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        for pid in list(self._children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._children.discard(pid)

    def close(self) -> None:
        self.reconcile()


def superexec_main(argv: Sequence[str]) -> int:
    """``flower-superexec ARGV`` with :class:`ForkExecutor`: warm imports, one fork per ClientApp task."""
    import flwr.supercore.superexec.run_superexec as rs

    # Warm imports, done once: Flower's ClientApp runner, the protocol, and for training torch + the loop.
    import flwr.supernode.cli.flwr_clientapp  # noqa: F401
    from flwr.supercore.cli.flower_superexec import flower_superexec

    import fl.sums.secagg
    import secagg.masking.client
    import secagg.wire  # noqa: F401

    try:
        import fl.training.client  # noqa: F401  (torch)
    except ImportError as exc:
        log.warning("cannot pre-import fl.training.client (%s); tasks will import it themselves", exc)
    if hasattr(rs, "get_executor"):
        rs.__dict__["get_executor"] = lambda *a, **kw: ForkExecutor()
    else:
        log.warning("this Flower version has no SuperExec executor hook; ClientApps start as fresh processes")
    sys.argv = ["flower-superexec", *argv]
    flower_superexec()
    return 0
