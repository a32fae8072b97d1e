"""The example Flower app (examples/flower_app) under ``flwr run`` on real local processes with TLS.

A SuperLink and 3 SuperNodes (``LocalCluster``: TLS on 127.0.0.1, each node pinned to the apps its policy
trusts; here the example's bundle by its SHA-256). The ServerApp is Flower's own FedAvg with
``SecureAggregation.wrap``; the ClientApp is plain Flower code with ``privagg_mod``. The test recomputes
every node's update in this process (the training is seeded) and checks that the mean update the server
decoded equals the plain weighted mean of the clients' updates within the quantization bound: the
secure sum through Flower is exact.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("torch")

from fl.runners.flower import CONNECTION, LocalCluster, NodePolicy
from fl.runners.flower.processes import exe_path, group_alive

pytestmark = [pytest.mark.flower, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "flower_app"


def _copy_app(dst: Path) -> Path:
    shutil.copytree(EXAMPLE, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def _fab_hash(app: Path) -> str:
    import warnings

    from flwr.cli.build import build_fab_from_disk

    from secagg._hazmat.pki import sha256_hex

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return sha256_hex(build_fab_from_disk(app))


def _cluster(tmp_path: Path, *, paillier: bool) -> Iterator[tuple[LocalCluster, Path]]:
    """SuperLink + 3 client SuperNodes (TLS), each pinned to the example's bundle; with ``paillier`` also a
    key-holder SuperNode whose public key every client's policy pins (the aggregator never holds the key)."""
    app = _copy_app(tmp_path / "flower_app")
    key_holder, policy = None, NodePolicy(trusted_app_hashes=(_fab_hash(app),))
    if paillier:
        from fl.runners.flower.keyholder import keygen, read_public_key

        key_holder, public = keygen(tmp_path / "keyholder-site", bits=2048)
        policy = NodePolicy(trusted_app_hashes=(_fab_hash(app),), protocols=("secagg", "secagg+", "paillier"),
                            paillier_key_fingerprint=read_public_key(public).fingerprint.hex())
    c = LocalCluster(tmp_path / "cluster", 3, tls=True, host="127.0.0.1", fleet_poll=0.1, policy=policy,
                     key_holder=key_holder)
    try:
        c.start(timeout=60)
        yield c, app
    finally:
        c.stop()
        started = [p.pid for p in [c.superlink, *c.nodes.values()] if p is not None]
        assert started and not [pid for pid in started if group_alive(pid)], "a Flower process outlived the test"


@pytest.fixture
def app_cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, Path]]:
    yield from _cluster(tmp_path, paillier=False)


@pytest.fixture
def paillier_cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, Path]]:
    yield from _cluster(tmp_path, paillier=True)


def _flwr_run(c: LocalCluster, app: Path, **config: Any) -> None:
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    cp = subprocess.run([exe_path("flwr"), "run", str(app), CONNECTION, "--run-config", overrides], env=c.env,
                        capture_output=True, text=True, timeout=120, cwd=c.workdir)
    assert cp.returncode == 0, f"flwr run failed: {cp.stdout}\n{cp.stderr}"


def _wait(path: Path, c: LocalCluster, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return dict(json.loads(path.read_text()))
        assert c.superlink.poll() is None, "the SuperLink died"
        time.sleep(0.3)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(c.logs.glob("*.log")))
    raise TimeoutError(f"no {path} after {timeout}s\n{logs}")


def _recompute(app: Path, glob: np.ndarray, rnd: int, cfg: dict[str, Any]) -> tuple[np.ndarray, float]:
    """Every node's update of round ``rnd`` from ``glob``, recomputed here; their weighted mean and total weight."""
    sys.path.insert(0, str(app))
    try:
        from flwr.app import ArrayRecord
        from privagg_app.client_app import local_update
        from privagg_app.task import make_model

        from fl.runners.flower.mod import flatten, unflatten

        like = ArrayRecord(make_model().state_dict())
        arrays = unflatten(glob, like)
        ups, ws = [], []
        for pid in range(3):
            new, n, _ = local_update(arrays, {"partition-id": pid}, cfg, rnd)
            ups.append(flatten(new) - flatten(arrays))
            ws.append(float(n))
    finally:
        sys.path.remove(str(app))
        for name in [m for m in sys.modules if m == "privagg_app" or m.startswith("privagg_app.")]:
            del sys.modules[name]
    w = np.array(ws)
    return (w[:, None] * np.stack(ups)).sum(0) / w.sum(), float(w.sum())


def test_example_app_under_flwr_run_sums_exactly(app_cluster: tuple[LocalCluster, Path], tmp_path: Path) -> None:
    _check_example_run(*app_cluster, tmp_path, protocol="secagg+")


def test_example_app_under_flwr_run_with_paillier_and_a_key_holder_node(
        paillier_cluster: tuple[LocalCluster, Path], tmp_path: Path) -> None:
    """The same app, ``protocol="paillier"``: the 4th SuperNode is the key holder (never sampled by FedAvg,
    never running the user's ClientApp); the decoded mean update is the plain weighted mean, as with SecAgg+."""
    _check_example_run(*paillier_cluster, tmp_path, protocol="paillier")


def _check_example_run(c: LocalCluster, app: Path, tmp_path: Path, *, protocol: str) -> None:
    out = tmp_path / "out"
    _flwr_run(c, app, **{"out-dir": str(out), "num-server-rounds": 2, "protocol": protocol})
    result = _wait(out / "result.json", c, timeout=300)
    assert "https://127.0.0.1" in (c.logs / "superlink.log").read_text()  # TLS
    cfg = {"local-epochs": 1, "learning-rate": 0.1}
    glob = np.asarray(result["initial"])
    from fl.runners.flower.workflow import SecureAggregation

    defaults = SecureAggregation().terms  # the example uses the default quantization: bits within +-clipping_range
    bits, bound = defaults.bits, defaults.clipping_range
    step = bound / ((1 << (bits - 1)) - 1)
    for r in result["rounds"]:
        assert len(r["included"]) == 3 and sorted(r["included"]) == sorted(r["planned"])
        mean, weight = _recompute(app, glob, r["round"], cfg)
        assert r["weight"] == pytest.approx(weight)
        w = weight / 1000.0
        # each of 3 summands (weight and weighted update) is off by less than one quantization step
        tol = 3 * step / w * (1 + np.abs(mean).max())
        got = np.asarray(r["mean_update"])
        assert np.max(np.abs(got - mean)) <= tol
        assert np.max(np.abs(mean)) > 100 * tol  # the check is not vacuous: the updates are far above the bound
        glob = (glob + got).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(result["final"], glob, atol=1e-7)
