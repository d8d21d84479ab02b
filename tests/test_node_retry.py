"""Which replica failures the node retries, in the node's own ModelHost with real engines: a permanent
configuration error (a missing weights file) is not retried until its assignment comes again; a server
that cannot be reached is retried with backoff for as long as the replica is declared."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fleetlm.controlplane.v1 import node_pb2
from launcher.default_model import default_model_path
from mesh.lifecycle import free_port
from node_agent.host import ModelHost
from node_agent.settings import NodeSettings


def settings() -> NodeSettings:
    return NodeSettings(node_id="retry-test", threads=2, engine_health_seconds=0.3)


def failed_loads(caplog: pytest.LogCaptureFixture, model: str) -> int:
    return sum(1 for r in caplog.records if r.getMessage().startswith(f"model {model} failed to load"))


async def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# Longer than the first two backoff steps (1 s + 2 s): a retrying host would have tried twice more.
BEYOND_TWO_RETRIES = 4.0


@pytest.mark.model
async def test_a_missing_weights_file_is_not_retried_until_its_assignment_comes_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node_agent")
    weights = tmp_path / "smol.gguf"  # not there yet
    spec = node_pb2.ModelSpec(name="later", path=str(weights), format="gguf", engine="llamacpp", context_size=512,
                              max_running_requests=1)  # fmt: skip
    assignment = node_pb2.Assignment(node_id="retry-test", model=spec, device="cpu")
    host = ModelHost([], settings())
    try:
        host.apply_assignments([assignment])
        hosted = host.models["later"]
        await wait_until(lambda: hosted.state == node_pb2.REPLICA_STATE_FAILED, 30, "the load to fail")
        assert hosted.error == f"model file not found: {weights}"
        await asyncio.sleep(BEYOND_TWO_RETRIES)
        assert failed_loads(caplog, "later") == 1
        assert hosted.state == node_pb2.REPLICA_STATE_FAILED

        # The operator puts the file in place; the same assignment, delivered again (the stream's
        # resync), loads it.
        os.symlink(default_model_path(), weights)
        host.apply_assignments([assignment])
        # 120 s: loading the model on a busy 2-core machine.
        await wait_until(lambda: hosted.state == node_pb2.REPLICA_STATE_READY, 120, "the replica to load")
        assert hosted.error == "" and failed_loads(caplog, "later") == 1
        # Delivered again while it is ready: nothing happens.
        host.apply_assignments([assignment])
        await asyncio.sleep(0.5)
        assert hosted.state == node_pb2.REPLICA_STATE_READY and host.models["later"] is hosted
    finally:
        await host.close()


async def test_a_catalog_model_with_a_missing_file_stays_failed_and_is_not_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node_agent")
    spec = node_pb2.ModelSpec(name="gone", path=str(tmp_path / "gone.gguf"), format="gguf", engine="llamacpp")
    host = ModelHost([spec], settings())
    try:
        host.start()
        hosted = host.models["gone"]
        await wait_until(lambda: hosted.state == node_pb2.REPLICA_STATE_FAILED, 30, "the load to fail")
        await asyncio.sleep(BEYOND_TWO_RETRIES)
        assert failed_loads(caplog, "gone") == 1
        assert "model file not found" in hosted.error
    finally:
        await host.close()


async def test_a_catalog_server_that_cannot_be_reached_is_retried_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="node_agent")
    url = f"http://127.0.0.1:{free_port()}/v1"  # nobody listens there
    spec = node_pb2.ModelSpec(name="away", path=url, format="gguf", engine="openai")
    host = ModelHost([spec], settings())
    try:
        host.start()
        hosted = host.models["away"]
        # Tries at 0 s, 1 s, 3 s: three failures within ~3 s; 60 s is a generous bound for a busy machine.
        await wait_until(lambda: failed_loads(caplog, "away") >= 3, 60, "three failed loads")
        assert "unreachable" in hosted.error
        assert hosted.task is not None and not hosted.task.done()  # still trying
    finally:
        await host.close()
