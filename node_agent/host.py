"""The models this node hosts: one engine per replica, its state, its load and its limits.

Replicas come from two places: the node's own catalog (loaded at start, kept for the agent's life) and
the control plane's assignments (loaded and unloaded as the assignments change). An assigned replica
that fails to load is retried with backoff while it stays assigned. A replica whose engine fails later
(its process crashed, its server stopped answering) is failed with the reason and started again with
backoff. Unloading is graceful: the replica refuses new requests at once, lets the running and queued
ones finish, then frees its engine (and stops its process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from google.protobuf import timestamp_pb2

from fleetlm.controlplane.v1 import node_pb2
from fleetlm.inference.v1 import inference_pb2
from mesh.catalog import ENGINE_FORMATS, queue_limit, running_limit
from mesh.errors import ErrorCode, FleetError
from mesh.lifecycle import free_port
from node_agent.engines.base import Engine, EngineError
from node_agent.engines.launched import LaunchedServerEngine, command_launch
from node_agent.engines.openai_server import OpenAIServerConfig, OpenAIServerEngine
from node_agent.engines.sglang import GpuShare, sglang_launch
from node_agent.settings import NodeSettings

log = logging.getLogger(__name__)

_STATE_TO_MODEL = {
    node_pb2.REPLICA_STATE_PENDING: inference_pb2.MODEL_STATE_LOADING,
    node_pb2.REPLICA_STATE_LOADING: inference_pb2.MODEL_STATE_LOADING,
    node_pb2.REPLICA_STATE_READY: inference_pb2.MODEL_STATE_READY,
    node_pb2.REPLICA_STATE_FAILED: inference_pb2.MODEL_STATE_FAILED,
}

RETRY_MAX_SECONDS = 60.0
UNLOAD_GRACE_SECONDS = 120.0


@dataclass
class HostedModel:
    spec: node_pb2.ModelSpec
    assigned: bool = False
    device: str = "cpu"
    gpu_indices: tuple[int, ...] = ()  # from the assignment
    memory_bytes: int = 0  # the placement's budget, from the assignment
    state: int = node_pb2.REPLICA_STATE_PENDING
    error: str = ""
    engine: Engine | None = None
    context_size: int = 0
    last_request_at: float = field(default_factory=time.time)
    rejected: int = 0
    unloading: bool = False
    task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def busy(self) -> int:
        return self.engine.load.running + self.engine.load.queued if self.engine else 0

    @property
    def capacity(self) -> int:
        return running_limit(self.spec) + queue_limit(self.spec)


class ModelHost:
    def __init__(
        self, catalog: Iterable[node_pb2.ModelSpec], settings: NodeSettings, gpus: Sequence[node_pb2.Gpu] = ()
    ) -> None:
        self.models: dict[str, HostedModel] = {s.name: HostedModel(s) for s in catalog}
        self._settings = settings
        self._gpus = list(gpus)
        self._gpu_count = len(self._gpus)
        self.changed = asyncio.Event()  # set on state and load changes, so heartbeats go out promptly
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        # Loads and unloads are owned here (and cancelled by close), never left to the garbage collector.
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- engines --------------------------------------------------------------------------------------

    def _make_engine(self, hosted: HostedModel) -> Engine:
        spec = hosted.spec
        if spec.format not in ENGINE_FORMATS.get(spec.engine, set()):
            raise FleetError(
                ErrorCode.FORMAT_NOT_SUPPORTED, f"engine '{spec.engine}' cannot run '{spec.format}' weights"
            )
        if spec.engine == "sglang":
            return self._sglang_engine(hosted)
        if spec.engine == "openai":
            return self._openai_engine(hosted)
        if spec.engine == "llamacpp":
            from node_agent.engines.llamacpp import LlamaCppConfig, LlamaCppEngine

            use_gpu = hosted.device == "gpu" or (spec.device != "cpu" and self._gpu_count > 0)
            hosted.device = "gpu" if use_gpu and self._gpu_count > 0 else "cpu"
            return LlamaCppEngine(
                LlamaCppConfig(
                    path=spec.path,
                    context_size=spec.context_size or 2048,
                    threads=self._settings.threads,
                    gpu_layers=-1 if use_gpu else 0,
                    slots=running_limit(spec),
                    unified_kv=self._settings.unified_kv,
                    nice=self._settings.engine_nice,
                )
            )
        raise EngineError(f"engine '{spec.engine}' is not supported by this node agent yet")

    def _client_config(self, hosted: HostedModel, base_url: str) -> OpenAIServerConfig:
        spec = hosted.spec
        return OpenAIServerConfig(
            base_url=base_url,
            name=spec.name,
            context_size=spec.context_size,
            slots=running_limit(spec),
            # A server that requires a key gets it as --api-key when the agent starts it (vLLM, SGLang).
            api_key=spec.engine_args.get("api-key", ""),
            health_interval=self._settings.engine_health_seconds,
        )

    def _sglang_engine(self, hosted: HostedModel) -> Engine:
        spec = hosted.spec
        nvidia = [g for g in self._gpus if g.vendor == "nvidia"]
        if not nvidia:
            raise FleetError(
                ErrorCode.FORMAT_NOT_SUPPORTED,
                f"model '{spec.name}' ({spec.format}) runs on SGLang, which needs an NVIDIA GPU; this node has none",
                param="format",
            )
        wanted = spec.gpu_count if spec.HasField("gpu_count") else 1
        indices = list(hosted.gpu_indices) or [g.index for g in nvidia[:wanted]]
        if len(indices) < wanted:
            raise EngineError(f"model '{spec.name}' needs {wanted} GPUs; this node has {len(nvidia)}")
        hosted.device = "gpu"
        share = GpuShare(indices, hosted.memory_bytes, {g.index: g.memory.total_bytes for g in nvidia})
        port = free_port()
        launch = sglang_launch(spec, share, port, self._settings.sglang_python)
        config = self._client_config(hosted, f"http://127.0.0.1:{port}")
        # SGLang serves the model under --served-model-name, the deployment's name.
        return LaunchedServerEngine(launch, replace(config, upstream_model=spec.name))

    def _openai_engine(self, hosted: HostedModel) -> Engine:
        spec = hosted.spec
        if spec.command:
            port = free_port()
            return LaunchedServerEngine(
                command_launch(spec, port), self._client_config(hosted, f"http://127.0.0.1:{port}")
            )
        if not spec.path.startswith(("http://", "https://")):
            raise EngineError(f"model '{spec.name}': engine 'openai' needs the server's URL as its path, or a command")
        return OpenAIServerEngine(self._client_config(hosted, spec.path))

    def _set(self, hosted: HostedModel, state: int, error: str = "") -> None:
        hosted.state, hosted.error = state, error
        self.changed.set()

    async def _load_once(self, hosted: HostedModel) -> bool:
        self._set(hosted, node_pb2.REPLICA_STATE_LOADING)
        engine: Engine | None = None
        try:
            engine = self._make_engine(hosted)
            info = await engine.start()
        except Exception as exc:
            if isinstance(exc, FleetError):
                reason = exc.message
            elif isinstance(exc, EngineError):
                reason = str(exc)
            else:
                log.exception("unexpected error loading %s", hosted.name)
                reason = f"unexpected error: {exc!r}"
            log.error("model %s failed to load: %s", hosted.name, reason)
            if engine is not None:
                await engine.close()
            self._set(hosted, node_pb2.REPLICA_STATE_FAILED, reason)
            return False
        hosted.engine, hosted.context_size = engine, info.context_size
        hosted.last_request_at = time.time()
        self._set(hosted, node_pb2.REPLICA_STATE_READY)
        log.info("model %s ready on %s (context %d)", hosted.name, hosted.device, info.context_size)
        return True

    async def _run_replica(self, hosted: HostedModel) -> None:
        """Load the replica, watch its engine, and start it again with backoff when it fails: a load
        that fails is retried while the replica stays assigned; an engine that dies is always restarted.
        The backoff starts over once the replica has stayed ready for RETRY_MAX_SECONDS."""
        backoff = 1.0
        while True:
            if await self._load_once(hosted):
                engine, ready_at = hosted.engine, time.monotonic()
                assert engine is not None
                try:
                    reason = await engine.watch()
                except Exception as exc:
                    log.exception("watching %s failed", hosted.name)
                    reason = f"the engine's health check failed: {exc!r}"
                log.error("model %s failed: %s", hosted.name, reason)
                hosted.engine = None
                self._set(hosted, node_pb2.REPLICA_STATE_FAILED, reason)
                await engine.close()  # requests still on it fail now, not later
                if time.monotonic() - ready_at >= RETRY_MAX_SECONDS:
                    backoff = 1.0
            elif not hosted.assigned:
                return  # a catalog model that cannot load: the operator fixes the catalog and restarts
            log.info("starting %s again in %.0fs", hosted.name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX_SECONDS)

    async def load_all(self) -> None:
        for hosted in self.models.values():
            hosted.task = self._spawn(self._run_replica(hosted))
        await asyncio.gather(*(h.task for h in self.models.values() if h.task is not None))

    async def _unload(self, hosted: HostedModel, why: str) -> None:
        hosted.unloading = True
        self.changed.set()
        if hosted.task is not None and not hosted.task.done():
            hosted.task.cancel()
        deadline = time.monotonic() + UNLOAD_GRACE_SECONDS
        while hosted.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # in-flight requests finish first
        if hosted.engine is not None:
            await hosted.engine.close()
            hosted.engine = None
        if self.models.get(hosted.name) is hosted:
            del self.models[hosted.name]
        self.changed.set()
        log.info("model %s unloaded (%s)", hosted.name, why)

    def apply_assignments(self, assignments: Iterable[node_pb2.Assignment]) -> None:
        """Converge on the control plane's desired set: load what is new, unload what is gone."""
        desired = {a.model.name: a for a in assignments}
        for name, hosted in list(self.models.items()):
            if not hosted.assigned or hosted.unloading:
                continue
            wanted = desired.get(name)
            if wanted is None or wanted.model != hosted.spec:
                hosted.unloading = True  # now, so that a new spec of the same name is loaded below
                why = "no longer assigned" if wanted is None else "its deployment changed"
                self._spawn(self._unload(hosted, why))
        for name, assignment in desired.items():
            current = self.models.get(name)
            if current is not None and not current.unloading:
                if not current.assigned:
                    log.warning("assignment %s clashes with a catalog model of the same name; ignored", name)
                continue
            hosted = HostedModel(
                assignment.model,
                assigned=True,
                device=assignment.device or "cpu",
                gpu_indices=tuple(assignment.gpu_indices),
                memory_bytes=assignment.memory_bytes,
            )
            self.models[name] = hosted
            hosted.task = self._spawn(self._run_replica(hosted))
            self.changed.set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for hosted in list(self.models.values()):
            if hosted.task is not None:
                hosted.task.cancel()
            if hosted.engine is not None:
                await hosted.engine.close()
                hosted.engine = None

    # --- requests -------------------------------------------------------------------------------------

    def engine_for(self, model: str) -> tuple[HostedModel, Engine]:
        hosted = self.models.get(model)
        if hosted is None:
            known = sorted(self.models)
            raise FleetError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model '{model}' does not exist on this node; available models: {', '.join(known) or 'none'}",
                param="model",
                metadata={"available_models": ",".join(known)},
            )
        if hosted.engine is None or hosted.state != node_pb2.REPLICA_STATE_READY or hosted.unloading:
            state = "unloading" if hosted.unloading else node_pb2.ReplicaState.Name(hosted.state)  # type: ignore[arg-type]
            state = state.removeprefix("REPLICA_STATE_").lower()
            detail = f": {hosted.error}" if hosted.error else ""
            raise FleetError(ErrorCode.MODEL_UNAVAILABLE, f"model '{model}' is {state}{detail}", retry_after_seconds=5)
        return hosted, hosted.engine

    @contextlib.asynccontextmanager
    async def serving(self, model: str) -> AsyncIterator[tuple[HostedModel, Engine]]:
        """Admit one request: refused when the replica is full (running + queued at its limits)."""
        hosted, engine = self.engine_for(model)
        if hosted.busy >= hosted.capacity:
            hosted.rejected += 1
            code = ErrorCode.GPU_OVERLOADED if hosted.device == "gpu" else ErrorCode.NO_CAPACITY
            raise FleetError(
                code,
                f"model '{model}' on this node is full ({hosted.busy} requests; limit {hosted.capacity})",
                retry_after_seconds=1,
            )
        hosted.last_request_at = time.time()
        self.changed.set()
        try:
            yield hosted, engine
        finally:
            hosted.last_request_at = time.time()
            self.changed.set()

    # --- reports --------------------------------------------------------------------------------------

    def replicas(self) -> list[node_pb2.Replica]:
        result = []
        for hosted in self.models.values():
            if hosted.unloading:
                continue
            load = hosted.engine.load if hosted.engine is not None else None
            stamp = timestamp_pb2.Timestamp()
            stamp.FromNanoseconds(int(hosted.last_request_at * 1e9))
            result.append(
                node_pb2.Replica(
                    model=hosted.spec,
                    state=hosted.state,  # type: ignore[arg-type]
                    error=hosted.error,
                    running_requests=load.running if load else 0,
                    queued_requests=load.queued if load else 0,
                    last_request_at=stamp,
                    assigned=hosted.assigned,
                    device=hosted.device,
                    rejected_requests=hosted.rejected,
                )
            )
        return result

    def model_infos(self) -> list[inference_pb2.ModelInfo]:
        return [
            inference_pb2.ModelInfo(
                name=h.name,
                format=h.spec.format,
                engine=h.spec.engine,
                context_size=h.context_size or h.spec.context_size,
                state=_STATE_TO_MODEL[h.state],  # type: ignore[index]
                error=h.error,
                ready_replicas=int(h.state == node_pb2.REPLICA_STATE_READY),
            )
            for h in sorted(self.models.values(), key=lambda h: h.name)
        ]
