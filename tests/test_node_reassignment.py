"""A replica whose assignment disappears and comes back a moment later (a node cut off from the control
plane for longer than its lease, then back) carries on serving: no unload, no reload. One that stays
unassigned is unloaded after the grace. In the node's own ModelHost, with the real model."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest

from fleetlm.controlplane.v1 import node_pb2
from launcher.default_model import default_model_path
from node_agent import host as host_module
from node_agent.engines.base import Finished, SamplingOptions
from node_agent.host import ModelHost
from node_agent.settings import NodeSettings

pytestmark = [pytest.mark.model]


async def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def answer(host: ModelHost, model: str) -> Finished:
    async with host.serving(model) as (_, engine):
        async for event in engine.generate("The sky is", SamplingOptions(max_tokens=2, temperature=0)):
            if isinstance(event, Finished):
                return event
    raise AssertionError("no result")


async def test_an_assignment_that_comes_back_within_the_grace_keeps_its_replica_loaded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(host_module, "UNASSIGNED_GRACE_SECONDS", 1.5)
    caplog.set_level(logging.INFO, logger="node_agent")
    spec = node_pb2.ModelSpec(name="kept", path=str(default_model_path()), format="gguf", engine="llamacpp",
                              context_size=512, max_running_requests=1)  # fmt: skip
    assignment = node_pb2.Assignment(node_id="n", model=spec, device="cpu")
    host = ModelHost([], NodeSettings(node_id="n", threads=2))
    try:
        host.apply_assignments([assignment])
        hosted = host.models["kept"]
        await wait_until(lambda: hosted.state == node_pb2.REPLICA_STATE_READY, 60, "the model to load")
        engine = hosted.engine

        # The assignment disappears (its lease lapsed at the control plane) and comes back within the grace.
        host.apply_assignments([])
        await asyncio.sleep(0.5)
        assert (await answer(host, "kept")).completion_tokens >= 1  # still serving meanwhile
        host.apply_assignments([assignment])
        await asyncio.sleep(2.0)  # past the grace: nothing was pending any more
        assert host.models.get("kept") is hosted and hosted.engine is engine and not hosted.unloading
        assert sum("kept ready" in r.getMessage() for r in caplog.records) == 1  # loaded once

        # Gone for good: unloaded once the grace is over.
        host.apply_assignments([])
        await wait_until(lambda: "kept" not in host.models, 30, "the unload")
    finally:
        await host.close()
