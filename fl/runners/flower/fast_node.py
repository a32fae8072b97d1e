"""privagg's tuned SuperNode and SuperExec: the ONE module that patches Flower internals.

``privagg flower supernode`` starts :func:`supernode_main`; with ``poll > 0`` it shortens the SuperNode's
idle poll (Flower sleeps a fixed 3 s when the SuperLink has no message) and forks each ClientApp from a
warm process (:func:`superexec_main`, :class:`ForkExecutor`) instead of starting a fresh interpreter per
message; it also retries object pulls that came too early after 10 ms instead of Flower's 1 s
(:func:`shorten_pull_backoff`) and checks its own state for a ClientApp's reply every 10 ms. All reach
into Flower modules that are not public API, so they are applied only on the Flower versions they
were written and tested against (:data:`PATCHED_FLOWER`); on any other version, or when an internal
has moved, the node runs Flower's stock loop unchanged and logs a warning saying so.
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

__all__ = ["PATCHED_FLOWER", "ForkExecutor", "patch_supported", "shorten_pull_backoff", "superexec_main",
           "supernode_main"]

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


LOCAL_WAIT = 0.01
"""Cap (seconds) on the SuperNode loop's short local waits (Flower: 0.5 s) on the fast path."""


class _FastClock:
    """Stands in for the ``time`` module inside Flower's SuperNode loop.

    The loop sleeps for two reasons. With no message from the SuperLink it sleeps 3 s before asking
    again over the network: capped at ``poll``. While its ClientApp runs it sleeps 0.5 s between looks
    at its own in-memory state for the reply (and for a reply object's content): no network round trip,
    so capped at :data:`LOCAL_WAIT` instead of ``poll`` (on average ~45 ms saved per node and phase).
    """

    def __init__(self, poll: float) -> None:
        self.poll = poll

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.poll if seconds >= 1.0 else min(self.poll, LOCAL_WAIT)))


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
    * Object pulls: a ClientApp starts while its SuperNode is still pulling the message's objects, and
      Flower retries a pull that came too early after 1 s, then 2 s; here after 10 ms, doubling up to
      ``poll`` (:func:`shorten_pull_backoff`, in the SuperNode and in the forked ClientApps).

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
    if poll > 0 and _shorten_poll(poll):
        shorten_pull_backoff(poll)
        if fork and "--isolation" not in argv:
            _start_fork_superexec(argv, poll)
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


POLL_FLAG = "--privagg-poll"
"""First argument pair of :func:`superexec_main` when started by :func:`supernode_main`: the node's poll."""

PULL_BACKOFF_START = 0.01
"""First retry (seconds) of an object pull that found the object not there yet, on the fast path."""


def shorten_pull_backoff(cap: float) -> bool:
    """Retry not-yet-available object pulls after 10 ms, doubling up to ``cap`` s, instead of 1 s up to 10 s.

    A ClientApp is started as soon as its message is announced, while the SuperNode is still pulling
    the message's objects from the SuperLink (and the SuperLink may announce a message before the
    ServerApp has pushed all its objects). Each pull that comes too early makes Flower's
    ``pull_objects`` back off 1 s, then 2 s: 1-3 s per phase of idle waiting. Flower binds these
    backoffs as keyword defaults of ``pull_objects`` and ``pull_and_inflate_object_from_tree``;
    they are replaced in this process (and its forked ClientApps). False, with a warning, if those
    defaults have moved.
    """
    try:
        from flwr.supercore.inflatable import inflatable_utils as iu
    except ImportError:
        log.warning("this Flower version has no flwr.supercore.inflatable.inflatable_utils; object pulls keep "
                    "Flower's 1 s backoff")
        return False
    funcs: list[Any] = [getattr(iu, n, None) for n in ("pull_objects", "pull_and_inflate_object_from_tree")]
    kwdefaults = [getattr(f, "__kwdefaults__", None) or {} for f in funcs]
    if not all({"initial_backoff", "backoff_cap"} <= kw.keys() for kw in kwdefaults):
        log.warning("this Flower version's object pulls have no backoff to shorten; they keep Flower's backoff")
        return False
    for f, kw in zip(funcs, kwdefaults, strict=True):
        f.__kwdefaults__ = {**kw, "initial_backoff": min(PULL_BACKOFF_START, cap), "backoff_cap": cap}
    return True


def _start_fork_superexec(argv: Sequence[str], poll: float) -> None:
    """Start :func:`superexec_main` beside the SuperNode, on its Runtime API (same process group)."""
    import subprocess

    address, insecure, ca = _runtime_address(argv)
    cmd = [sys.executable, "-m", "fl.runners.flower", "superexec", POLL_FLAG, str(poll),
           "--runtime-api-address", address, "--parent-pid", str(os.getpid())]
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


def _split_poll(argv: Sequence[str]) -> tuple[float, list[str]]:
    """``[POLL_FLAG, SECONDS, *rest]`` -> ``(SECONDS, rest)``; without the flag, the default 0.1 s."""
    argv = list(argv)
    if argv[:1] == [POLL_FLAG]:
        if len(argv) < 2:
            raise ValueError(f"{POLL_FLAG} needs a number of seconds")
        return float(argv[1]), argv[2:]
    return 0.1, argv


def superexec_main(argv: Sequence[str]) -> int:
    """``flower-superexec ARGV`` with :class:`ForkExecutor`: warm imports, one fork per ClientApp task.

    ``argv`` may start with ``--privagg-poll SECONDS`` (the SuperNode's poll): the forked ClientApps
    then retry early object pulls at that cap (:func:`shorten_pull_backoff`).
    """
    import flwr.supercore.superexec.run_superexec as rs

    poll, argv = _split_poll(argv)
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
    if poll > 0:
        shorten_pull_backoff(poll)
    if hasattr(rs, "get_executor"):
        rs.__dict__["get_executor"] = lambda *a, **kw: ForkExecutor()
    else:
        log.warning("this Flower version has no SuperExec executor hook; ClientApps start as fresh processes")
    sys.argv = ["flower-superexec", *argv]
    flower_superexec()
    return 0
