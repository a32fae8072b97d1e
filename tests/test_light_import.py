"""A light import path: ``import fl`` and the Flower ClientApp load no ML stack (issue 16, speed (b)).

On a stock Flower SuperNode every message starts a fresh ``flwr-clientapp`` interpreter that imports
``fl.runners.flower:client_app``; when that pulled in torch, pandas, scikit-learn and scipy (through the
eager ``fl/__init__``) each exchange paid about 3.5 s before any protocol work. Claims, each checked in a
fresh interpreter (so ``sys.modules`` holds only what the code under test imported):

- ``import fl`` and ``import fl.runners.flower`` load none of :data:`HEAVY`;
- a whole SecAgg+ sum job (hello, start, every ``privagg_step``) and a Paillier sum job with its key holder
  (``privagg_keyholder``), run by the real ServerApp round over the real ClientApp, load none of them;
- a train job's ``privagg_step``, replayed (Context and Message as protobuf, as a stock SuperNode hands them
  over) in a fresh ClientApp interpreter, loads none of them either (slow: it trains a round first);
- every name of ``fl.__all__`` still resolves, ``from fl import *`` works, and ``fl.train`` loads the
  training stack only when called.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pandas", "sklearn", "scipy", "opacus", "tqdm", "matplotlib")

_REPORT = """
import json, sys
HEAVY = {heavy!r}
print(json.dumps({{"heavy": sorted({{m.split(".")[0] for m in sys.modules}} & set(HEAVY)), "out": OUT}}))
"""


def _fresh(code: str) -> dict[str, object]:
    """Run ``code`` (which sets ``OUT``) in a fresh interpreter; its heavy top-level modules and ``OUT``."""
    script = textwrap.dedent(code) + _REPORT.format(heavy=HEAVY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_import_fl_loads_no_ml_stack_and_resolves_names_on_use() -> None:
    got = _fresh("""
        import fl
        before = sorted(set(fl.__dict__) & set(fl.__all__))
        import sys
        light = fl.SecAggPlus, fl.SecAgg, fl.PaillierSum, fl.PlainSum, fl.Pipeline, fl.ValueSpec, fl.Ledger
        errors = fl.CompositionError, fl.DataError, fl.TrainConfig, fl.PrivacyConfig
        noise = fl.GaussianNoise(multiplier=1.0, placement="clients", shares=3, discrete=True)
        bound = fl.Pipeline([fl.Clip(l2=1.0), noise, fl.Quantize(bits=16)], sum=fl.SecAggPlus(threshold=0.6)).bind(
            fl.ValueSpec(size=10, cohort=3))
        OUT = {"cached_before": before, "cached_after": sorted(set(fl.__dict__) & set(fl.__all__)),
               "accounting": "dp_accounting" in sys.modules}
    """)
    assert got["heavy"] == []  # the layers, sums, pipeline and configs need no ML stack either
    out = got["out"]
    assert isinstance(out, dict) and out["cached_before"] == ["train"] and len(out["cached_after"]) == 15
    assert out["accounting"] is False  # binding a client's noisy pipeline needs no accountant (a mod's start)


def test_star_import_and_every_name_resolve_in_a_fresh_interpreter() -> None:
    got = _fresh("""
        import inspect
        import fl
        from fl import *  # noqa: F403
        missing = [n for n in fl.__all__ if n not in globals()]
        OUT = {"missing": missing, "first": next(iter(inspect.signature(train).parameters)),
               "same": Federation is fl.training.loop.Federation and secure_sum is fl.api.secure_sum}
    """)
    assert got["out"] == {"missing": [], "first": "config", "same": True}
    assert "torch" in got["heavy"]  # the train-side names do load the training stack, as they must


def test_fl_train_loads_the_training_stack_only_when_called() -> None:
    got = _fresh("""
        import sys
        import fl
        f = fl.train
        OUT = {"torch_before_call": "torch" in sys.modules}
        try:
            fl.train(rounds=1)  # no model, no sites: a clear error from fl.api, after importing it
        except Exception as exc:
            OUT["error"] = type(exc).__name__
        OUT["api_loaded"] = "fl.api" in sys.modules
    """)
    out = got["out"]
    assert isinstance(out, dict) and out["torch_before_call"] is False
    assert out["api_loaded"] is True and "error" in out


def test_import_the_flower_client_app_loads_no_ml_stack() -> None:
    pytest.importorskip("flwr")
    got = _fresh("""
        import fl.runners.flower
        from fl.runners.flower import client_app, server_app
        import fl.runners.flower.mod, fl.runners.flower.workflow, fl.runners.flower.keyholder
        OUT = type(client_app).__name__
    """)
    assert got == {"heavy": [], "out": "ClientApp"}


_SUM_JOB = """
    import sys, tempfile
    from pathlib import Path
    from flwr.supercore.task_identity import TaskIdentity
    from fl.runners.flower import FlowerJob, NodePolicy
    from fl.runners.flower.keyholder import keygen, read_public_key
    from fl.runners.flower.link import Progress
    from fl.runners.flower.serverapp import serve
    from tests.adversary.flower_harness import InProcessGrid, key_holder_context, node_context

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1  # as a ServerApp process
    tmp = Path(tempfile.mkdtemp())
    protocol = {protocol!r}
    extra, policy = {{}}, None
    if protocol == "paillier":
        private, public = keygen(tmp / "kh", bits=1024)
        extra["paillier_public_key"] = public.read_text()
        fp = read_public_key(public).fingerprint.hex()
        policy = NodePolicy(protocols=("paillier",), paillier_key_fingerprint=fp).save(tmp / "policy.json")
    job = FlowerJob(task="sum", out=str(tmp / "out"), clients=3, size=64, rounds=2, protocol=protocol,
                    threshold=0.6, join_timeout=5, start_timeout=60, phase_timeout=60, poll_interval=0.0, **extra)
    ctx = {{100 + c: node_context(tmp, 100 + c, c, 3, job.to_json(), policy=policy) for c in range(3)}}
    if protocol == "paillier":
        ctx[900] = key_holder_context(tmp, 900, job.to_json(), private, policy=policy)
    kinds = set()
    def seen(node, msg):
        kinds.add(msg.metadata.message_type)
        return msg
    result = serve(InProcessGrid(ctx, rewrite=seen), job, Progress(Path(job.out)))
    OUT = {{"exact": [r["exact"] for r in result["rounds"]], "kinds": sorted(kinds)}}
"""


@pytest.mark.parametrize("protocol", ["secagg+", "paillier"])
def test_a_sum_job_over_the_real_client_app_loads_no_ml_stack(protocol: str) -> None:
    """Hello, start and every step (and the key holder's decryption) of a sum job: no torch, pandas, sklearn."""
    pytest.importorskip("flwr")
    got = _fresh(_SUM_JOB.format(protocol=protocol))
    out = got["out"]
    assert isinstance(out, dict) and out["exact"] == [True, True]
    last = "query.privagg_keyholder" if protocol == "paillier" else "query.privagg_step"
    assert out["kinds"] == sorted(["query.privagg_hello", "train.privagg_start", last])  # each reached a ClientApp
    assert got["heavy"] == []


_REPLAY = """
    import sys
    from pathlib import Path
    from flwr.common.serde import context_from_proto, message_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext, Message as ProtoMessage
    from fl.runners.flower import client_app

    tmp = Path({tmp!r})
    msg = message_from_proto(ProtoMessage.FromString((tmp / "step.msg").read_bytes()))
    ctx = context_from_proto(ProtoContext.FromString((tmp / "step.ctx").read_bytes()))
    reply = client_app(msg, ctx)
    OUT = reply.error.reason if reply.has_error() else len(reply.content["privagg"]["msgs"])
"""


@pytest.mark.slow
def test_a_train_jobs_step_in_a_fresh_clientapp_loads_no_ml_stack(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """What a stock SuperNode does per message: Context and Message cross as protobuf into a fresh process.

    A 1-round train job runs here (the starts train: torch is loaded in this process); node 100's first
    ``privagg_step`` and its Context as it was then are replayed in a fresh interpreter, which answers it
    from the sealed machine snapshot alone: no torch, pandas or scikit-learn for a later phase.
    """
    pytest.importorskip("flwr")
    from flwr.app import Message
    from flwr.common.serde import context_to_proto, message_to_proto

    from fl.config import PrivacyConfig, TrainConfig
    from fl.runners.flower import FlowerJob
    from fl.runners.flower.link import Progress
    from fl.runners.flower.serverapp import serve
    from tests.adversary.flower_harness import InProcessGrid, node_context, server_identity

    server_identity(monkeypatch)  # this process plays the ServerApp
    config = TrainConfig(dataset="breast_cancer", clients=3, rounds=1, seed=3, model="logreg",
                         privacy=PrivacyConfig(spec="clip,dnoise,secagg+", clip=1.0, noise_multiplier=1.0,
                                               threshold=0.6))
    job = FlowerJob(task="train", out=str(tmp_path / "out"), config=config.as_dict(), join_timeout=5,
                    start_timeout=60, phase_timeout=60, poll_interval=0.0)
    ctx = {100 + c: node_context(tmp_path, 100 + c, c, 3, job.to_json()) for c in range(3)}

    def grab(node: int, msg: Message) -> Message:
        if node == 100 and msg.metadata.message_type == "query.privagg_step" and not (tmp_path / "step.msg").exists():
            (tmp_path / "step.msg").write_bytes(message_to_proto(msg).SerializeToString())
            (tmp_path / "step.ctx").write_bytes(context_to_proto(ctx[100]).SerializeToString())
        return msg

    result = serve(InProcessGrid(ctx, rewrite=grab), job, Progress(Path(job.out)))  # type: ignore[arg-type]
    assert len(result["rounds"]) == 1
    got = _fresh(_REPLAY.format(tmp=str(tmp_path)))
    assert got["out"] == 1 and got["heavy"] == []  # one reply message (the masked input), from no ML stack
