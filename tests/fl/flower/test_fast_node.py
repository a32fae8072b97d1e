"""The fast SuperNode path patches Flower internals only on the Flower versions it was tested on.

On any other version (or when an internal it needs has moved) the node must run Flower's stock loop
with a warning, never a half-applied patch; the app pin is installed either way.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

pytest.importorskip("flwr")

import flwr.supernode.cli as supernode_cli
import flwr.supernode.start_client_internal as sci

from fl.runners.flower import fast_node, pin


@pytest.mark.parametrize(("version", "ok"), [("1.41.2", True), ("1.42.0", True), ("1.40.9", False),
                                             ("1.43.0", False), ("2.0.0", False), ("nightly", False), ("", False)])
def test_patch_is_gated_on_tested_flower_versions(version: str, ok: bool) -> None:
    assert fast_node.patch_supported(version) is ok


def test_installed_flower_is_a_patched_version() -> None:
    """The pinned dev Flower is one the fast path supports (else CI would only test the fallback)."""
    assert fast_node.patch_supported()


def _run_node(monkeypatch: pytest.MonkeyPatch, *, supported: bool) -> dict[str, Any]:
    seen: dict[str, Any] = {"pinned": 0, "superexec": 0}
    monkeypatch.setitem(sci.__dict__, "time", time)  # restored after the test
    monkeypatch.setattr(fast_node, "patch_supported", lambda version=None: supported)
    def shorten(cap: float) -> bool:
        seen["backoff_cap"] = cap
        return True

    monkeypatch.setattr(fast_node, "shorten_pull_backoff", shorten)
    monkeypatch.setattr(pin, "install_app_pin", lambda policy: seen.__setitem__("pinned", seen["pinned"] + 1))
    monkeypatch.setattr(fast_node, "_start_fork_superexec",
                        lambda argv, poll: seen.__setitem__("superexec", seen["superexec"] + 1))

    def fake_supernode() -> None:
        import sys

        seen["argv"] = list(sys.argv)
        seen["clock"] = sci.__dict__["time"]

    monkeypatch.setattr(supernode_cli, "flower_supernode", fake_supernode)
    monkeypatch.setattr("sys.argv", ["test"])
    assert fast_node.supernode_main(0.1, ["--superlink", "127.0.0.1:1", "--insecure"]) == 0
    return seen


def test_supported_flower_gets_the_short_poll_and_forked_clientapps(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _run_node(monkeypatch, supported=True)
    assert seen["pinned"] == 1
    assert seen["clock"] is not time and seen["clock"].poll == 0.1
    assert seen["superexec"] == 1 and "--isolation" in seen["argv"]
    assert seen["backoff_cap"] == 0.1


def test_other_flower_runs_the_stock_loop_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fl.runners.flower"):
        seen = _run_node(monkeypatch, supported=False)
    assert seen["pinned"] == 1  # the pin is never skipped
    assert seen["clock"] is time, "Flower's poll loop was patched on an untested version"
    assert seen["superexec"] == 0 and "--isolation" not in seen["argv"]
    assert "backoff_cap" not in seen, "Flower's pull backoff was patched on an untested version"
    assert any("stock SuperNode loop" in r.getMessage() for r in caplog.records)


def test_moved_poll_loop_falls_back_without_forking(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A supported version whose loop no longer reads ``time`` from its module: no patch, no fork."""
    monkeypatch.setitem(sci.__dict__, "time", object())
    seen: dict[str, Any] = {"superexec": 0}
    monkeypatch.setattr(fast_node, "patch_supported", lambda version=None: True)
    monkeypatch.setattr(pin, "install_app_pin", lambda policy: None)
    monkeypatch.setattr(fast_node, "_start_fork_superexec",
                        lambda argv, poll: seen.__setitem__("superexec", seen["superexec"] + 1))
    monkeypatch.setattr(supernode_cli, "flower_supernode", lambda: None)
    monkeypatch.setattr("sys.argv", ["test"])
    with caplog.at_level(logging.WARNING, logger="fl.runners.flower"):
        fast_node.supernode_main(0.1, ["--insecure"])
    assert seen["superexec"] == 0
    assert any("no SuperNode poll loop" in r.getMessage() for r in caplog.records)


def _pull_one_late_object(available_after: int) -> float:
    """Seconds Flower's ``pull_objects`` takes for an object the server reports missing ``available_after`` times."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

    calls = {"n": 0}

    def pull(object_id: str) -> bytes:
        calls["n"] += 1
        if calls["n"] <= available_after:
            raise ObjectUnavailableError(object_id)
        return b"content"

    t0 = time.perf_counter()
    assert pull_objects(["obj"], pull) == {"obj": b"content"}
    return time.perf_counter() - t0


@pytest.fixture
def restore_pull_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.inflatable import inflatable_utils as iu

    for name in ("pull_objects", "pull_and_inflate_object_from_tree"):
        f = getattr(iu, name)
        monkeypatch.setattr(f, "__kwdefaults__", dict(f.__kwdefaults__ or {}))


@pytest.mark.usefixtures("restore_pull_defaults")
def test_early_object_pull_retries_within_the_poll_not_after_a_second() -> None:
    """A ClientApp that asks for its message's objects before the SuperNode has them all (the usual case:
    the task starts as soon as the message is announced) waited Flower's 1 s backoff, then 2 s."""
    assert _pull_one_late_object(1) >= 0.75  # stock Flower: 1 s +- 20 %
    assert fast_node.shorten_pull_backoff(0.1)
    from flwr.supercore.inflatable import inflatable_utils as iu

    for name in ("pull_objects", "pull_and_inflate_object_from_tree"):
        kw = getattr(iu, name).__kwdefaults__ or {}
        assert kw["initial_backoff"] == fast_node.PULL_BACKOFF_START and kw["backoff_cap"] == 0.1
    assert _pull_one_late_object(3) < 0.5  # 10 + 20 + 40 ms (+- 20 %), plus scheduling on a loaded machine


@pytest.mark.usefixtures("restore_pull_defaults")
def test_moved_pull_backoff_is_left_alone_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    from flwr.supercore.inflatable import inflatable_utils as iu

    before = dict(iu.pull_objects.__kwdefaults__ or {})
    monkeypatch.delattr(iu, "pull_and_inflate_object_from_tree")
    with caplog.at_level(logging.WARNING, logger="fl.runners.flower"):
        assert not fast_node.shorten_pull_backoff(0.1)
    assert iu.pull_objects.__kwdefaults__ == before, "half-applied patch"
    assert any("no backoff to shorten" in r.getMessage() for r in caplog.records)


def test_superexec_reads_the_nodes_poll_flag() -> None:
    assert fast_node._split_poll([fast_node.POLL_FLAG, "0.05", "--insecure"]) == (0.05, ["--insecure"])
    assert fast_node._split_poll(["--insecure"]) == (0.1, ["--insecure"])
    with pytest.raises(ValueError, match="needs a number"):
        fast_node._split_poll([fast_node.POLL_FLAG])


def test_fast_clock_caps_network_polls_at_poll_and_local_waits_shorter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's loop sleeps 3 s when the SuperLink has nothing (a network poll: capped at ``poll``) and 0.5 s
    between looks at its own state for the ClientApp's reply (local: capped at ``LOCAL_WAIT``)."""
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = fast_node._FastClock(0.1)
    clock.sleep(3)
    clock.sleep(0.5)
    clock.sleep(0.001)
    assert slept == [0.1, fast_node.LOCAL_WAIT, 0.001]
    fast_node._FastClock(0.005).sleep(0.5)
    assert slept[-1] == 0.005  # never above the poll
    assert clock.monotonic is time.monotonic
