"""The models this node hosts: one engine per catalog entry, its replica state, and its load."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from fleetlm.controlplane.v1 import node_pb2
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError
from node_agent.catalog import ModelEntry
from node_agent.engines.base import Engine, EngineError

log = logging.getLogger(__name__)

_STATE_TO_MODEL = {
    node_pb2.REPLICA_STATE_PENDING: inference_pb2.MODEL_STATE_LOADING,
    node_pb2.REPLICA_STATE_LOADING: inference_pb2.MODEL_STATE_LOADING,
    node_pb2.REPLICA_STATE_READY: inference_pb2.MODEL_STATE_READY,
    node_pb2.REPLICA_STATE_FAILED: inference_pb2.MODEL_STATE_FAILED,
}

# Which engine runs which weights format, and where.
ENGINE_FORMATS = {"llamacpp": {"gguf"}, "sglang": {"hf", "awq"}, "openai": {"gguf", "hf", "awq"}}


@dataclass
class HostedModel:
    entry: ModelEntry
    state: int = node_pb2.REPLICA_STATE_PENDING
    error: str = ""
    engine: Engine | None = None
    context_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.context_size = self.entry.context_size


class ModelHost:
    def __init__(self, entries: list[ModelEntry], threads: int, gpu_count: int) -> None:
        self.models = {e.name: HostedModel(e) for e in entries}
        self._threads = threads
        self._gpu_count = gpu_count
        self.changed = asyncio.Event()  # set on every replica state change, so heartbeats go out at once

    def _make_engine(self, entry: ModelEntry) -> Engine:
        if entry.format not in ENGINE_FORMATS[entry.engine]:
            raise FleetError(
                ErrorCode.FORMAT_NOT_SUPPORTED,
                f"engine '{entry.engine}' cannot run '{entry.format}' weights",
            )
        if entry.engine == "llamacpp":
            from node_agent.engines.llamacpp import LlamaCppConfig, LlamaCppEngine

            use_gpu = entry.device != "cpu" and self._gpu_count > 0
            return LlamaCppEngine(
                LlamaCppConfig(
                    path=entry.path,
                    context_size=entry.context_size,
                    threads=self._threads,
                    gpu_layers=-1 if use_gpu else 0,
                )
            )
        raise EngineError(f"engine '{entry.engine}' is not supported by this node agent yet")

    def _set(self, hosted: HostedModel, state: int, error: str = "") -> None:
        hosted.state, hosted.error = state, error
        self.changed.set()

    async def load(self, hosted: HostedModel) -> None:
        self._set(hosted, node_pb2.REPLICA_STATE_LOADING)
        try:
            engine = self._make_engine(hosted.entry)
            info = await engine.start()
        except (EngineError, FleetError) as exc:
            log.error("model %s failed to load: %s", hosted.entry.name, exc)
            self._set(hosted, node_pb2.REPLICA_STATE_FAILED, str(exc))
            return
        hosted.engine, hosted.context_size = engine, info.context_size
        self._set(hosted, node_pb2.REPLICA_STATE_READY)
        log.info("model %s ready (context %d)", hosted.entry.name, info.context_size)

    async def load_all(self) -> None:
        await asyncio.gather(*(self.load(h) for h in self.models.values()))

    async def close(self) -> None:
        for hosted in self.models.values():
            if hosted.engine is not None:
                await hosted.engine.close()
                hosted.engine = None

    def engine_for(self, model: str) -> tuple[HostedModel, Engine]:
        hosted = self.models.get(model)
        if hosted is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise FleetError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model '{model}' does not exist on this node; available models: {known}",
                param="model",
                metadata={"available_models": ",".join(sorted(self.models))},
            )
        if hosted.engine is None or hosted.state != node_pb2.REPLICA_STATE_READY:
            state = node_pb2.ReplicaState.Name(hosted.state).removeprefix("REPLICA_STATE_").lower()
            detail = f": {hosted.error}" if hosted.error else ""
            raise FleetError(
                ErrorCode.MODEL_UNAVAILABLE, f"model '{model}' is {state}{detail}", retry_after_seconds=5
            )
        return hosted, hosted.engine

    def replicas(self) -> list[node_pb2.Replica]:
        result = []
        for hosted in self.models.values():
            load = hosted.engine.load if hosted.engine is not None else None
            result.append(
                node_pb2.Replica(
                    model=hosted.entry.spec(),
                    state=hosted.state,  # type: ignore[arg-type]
                    error=hosted.error,
                    running_requests=load.running if load else 0,
                    queued_requests=load.queued if load else 0,
                )
            )
        return result

    def model_infos(self) -> list[inference_pb2.ModelInfo]:
        return [
            inference_pb2.ModelInfo(
                name=h.entry.name,
                format=h.entry.format,
                engine=h.entry.engine,
                context_size=h.context_size,
                state=_STATE_TO_MODEL[h.state],  # type: ignore[index]
                error=h.error,
                ready_replicas=int(h.state == node_pb2.REPLICA_STATE_READY),
            )
            for h in sorted(self.models.values(), key=lambda h: h.entry.name)
        ]
