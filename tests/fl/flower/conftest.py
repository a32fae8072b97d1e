"""Fixtures for the in-process Flower tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _server_task_identity() -> Iterator[None]:
    """What a ServerApp process has set: Flower stamps run and node ids on every Message it creates."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # another Flower version: nothing to set
        yield
        return
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 7, 0
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
