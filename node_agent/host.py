"""The models this node hosts. `ModelHost` owns each replica's whole life: loading its engine, watching
it, retrying it, admitting its requests, reporting its state and load, and unloading it.

Replicas come from two places: the node's own catalog (loaded at start, kept for the agent's life) and
the control plane's assignments (loaded and unloaded as the assignments change).

Retries: a replica whose engine cannot start (its server is unreachable, it crashed or timed out while
starting) or fails later is retried with backoff (1 s, 2 s, 4 s ... 60 s; a server attached by URL at
least every engine health interval) for as long as it is declared or assigned. Only a permanent
configuration error (PermanentEngineError: a missing weights file, a format the engine cannot run, no GPU
for SGLang) stops the retries, with that reason on the replica; the next delivery of the same
assignment, or a new deployment, tries again.

Admission: a request is counted against the replica (running or waiting) in the same synchronous step
that admits it, so requests that arrive together cannot all get in past the limits. A request for n
choices counts n: each is a sequence of the engine's. That count is the load the node reports and what an
unload drains.

Unloading is graceful: the replica refuses new requests at once, lets the admitted ones finish, then
frees its engine (and stops its process). An engine still starting is stopped too.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from google.protobuf import timestamp_pb2

from fleetlm.controlplane.v1 import node_pb2
from fleetlm.inference.v1 import inference_pb2
from mesh.catalog import queue_limit, running_limit
from mesh.errors import ErrorCode, FleetError, invalid
from mesh.redaction import redact_spec
from node_agent.engine_factory import EngineFactory, Placement
from node_agent.engines.base import Engine, EngineError, PermanentEngineError
from node_agent.settings import NodeSettings

log = logging.getLogger(__name__)

_STATE_TO_MODEL = {
    node_pb2.REPLICA_STATE_PENDING: inference_pb2.MODEL_STATE_LOADING,
    node_pb2.REPLICA_STATE_LOADING: inference_pb2.MODEL_STATE_LOADING,
    node_pb2.REPLICA_STATE_READY: inference_pb2.MODEL_STATE_READY,
    node_pb2.REPLICA_STATE_FAILED: inference_pb2.MODEL_STATE_FAILED,
}

RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
UNLOAD_GRACE_SECONDS = 120.0
# How long a replica whose assignment disappeared keeps serving before it is unloaded. A node cut off
# from the control plane for longer than its lease loses its assignments there; when it is back, the
# control plane assigns the replica to it again a moment later. Without this pause the node would unload
# the model and load it again; with it, the replica simply carries on.
UNASSIGNED_GRACE_SECONDS = 5.0


class _Load(enum.Enum):
    READY = "ready"
    FAILED = "failed"  # worth trying again
    PERMANENT = "permanent"  # a configuration error: not until the spec or its assignment comes again


@dataclass
class HostedModel:
    spec: node_pb2.ModelSpec
    assigned: bool = False
    placement: Placement = field(default_factory=Placement)
    device: str = "cpu"
    state: int = node_pb2.REPLICA_STATE_PENDING
    error: str = ""
    engine: Engine | None = None
    context_size: int = 0
    last_request_at: float = field(default_factory=time.time)
    admitted: int = 0  # sequences admitted and not finished, running or waiting: the replica's load
    rejected: int = 0
    load_attempts: int = 0
    unloading: bool = False
    task: asyncio.Task[None] | None = None  # loads, watches and retries the engine; done: given up
    release: asyncio.Task[None] | None = None  # unassigned: unloads it after UNASSIGNED_GRACE_SECONDS
    starting: Engine | None = None  # the engine being loaded, for its load progress
    loading_since: float = 0.0  # when the current load attempt began (time.time())
    load_seconds: float = 0.0  # how long the last successful load took (the node's metrics)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def capacity(self) -> int:
        return running_limit(self.spec) + queue_limit(self.spec)

    def load(self) -> tuple[int, int]:
        """(running, queued): those the engine runs now, and the rest of the admitted ones."""
        running = min(self.engine.load.running, self.admitted) if self.engine is not None else 0
        return running, self.admitted - running


@runtime_checkable
class ReportsLoadProgress(Protocol):
    """An engine that can tell how much of its weights it has loaded (llama.cpp); it calls
    on_load_progress when that moves."""

    load_progress: float | None
    on_load_progress: Callable[[], None] | None


def _loading(replica: node_pb2.Replica, hosted: HostedModel) -> None:
    """The load progress of a loading replica: the fraction if its engine can tell, and since when."""
    if hosted.loading_since:
        replica.loading_since.FromNanoseconds(int(hosted.loading_since * 1e9))
    engine = hosted.starting
    if isinstance(engine, ReportsLoadProgress) and engine.load_progress is not None:
        replica.load_progress = engine.load_progress


class ModelHost:
    def __init__(
        self, catalog: Iterable[node_pb2.ModelSpec], settings: NodeSettings, gpus: Sequence[node_pb2.Gpu] = ()
    ) -> None:
        self.models: dict[str, HostedModel] = {s.name: HostedModel(s) for s in catalog}
        self._factory = EngineFactory(settings, gpus)
        self._health_seconds = settings.engine_health_seconds
        self.changed = asyncio.Event()  # set on state and load changes, so heartbeats go out promptly
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        # Loads and unloads are owned here (and cancelled by close), never left to the garbage collector.
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _close_engine(self, engine: Engine) -> asyncio.Task[None]:
        """Close an engine in a task of its own, which no cancellation interrupts (an unload while the
        agent stops, say): a process half-started is still stopped. close() waits for these."""

        async def closing() -> None:
            try:
                await engine.close()
            except Exception:
                log.exception("closing an engine failed")

        task = asyncio.ensure_future(closing())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    # --- a replica's life -----------------------------------------------------------------------------

    def _set(self, hosted: HostedModel, state: int, error: str = "") -> None:
        hosted.state, hosted.error = state, error
        self.changed.set()

    async def _load_once(self, hosted: HostedModel) -> _Load:
        hosted.loading_since = time.time()
        self._set(hosted, node_pb2.REPLICA_STATE_LOADING)
        hosted.load_attempts += 1
        engine: Engine | None = None
        try:
            built = self._factory.build(hosted.spec, hosted.placement)
            engine, hosted.device = built.engine, built.device
            hosted.starting = engine
            if isinstance(engine, ReportsLoadProgress):
                engine.on_load_progress = self.changed.set
            info = await engine.start()
        except BaseException as exc:
            hosted.starting = None
            if engine is not None:
                # Also when cancelled (unloaded while starting): the engine's process must not outlive it.
                await asyncio.shield(self._close_engine(engine))
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, EngineError):
                reason = str(exc)
            else:
                log.exception("unexpected error loading %s", hosted.name)
                reason = f"unexpected error: {exc!r}"
            permanent = isinstance(exc, PermanentEngineError)
            log.error("model %s failed to load%s: %s", hosted.name, " (not retried)" if permanent else "", reason)
            self._set(hosted, node_pb2.REPLICA_STATE_FAILED, reason)
            return _Load.PERMANENT if permanent else _Load.FAILED
        hosted.engine, hosted.context_size, hosted.starting = engine, info.context_size, None
        hosted.last_request_at = time.time()
        hosted.load_seconds = hosted.last_request_at - hosted.loading_since
        self._set(hosted, node_pb2.REPLICA_STATE_READY)
        log.info("model %s ready on %s (context %d)", hosted.name, hosted.device, info.context_size)
        return _Load.READY

    async def _run_replica(self, hosted: HostedModel) -> None:
        """Load the replica, watch its engine, and start it again with backoff whenever it fails, until
        it is unloaded (this task is cancelled) or a permanent error ends it. The backoff starts over
        once the replica has stayed ready for RETRY_MAX_SECONDS."""
        backoff = RETRY_FIRST_SECONDS
        while True:
            outcome = await self._load_once(hosted)
            if outcome is _Load.PERMANENT:
                return
            if outcome is _Load.READY:
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
                await asyncio.shield(self._close_engine(engine))  # requests still on it fail now, not later
                if time.monotonic() - ready_at >= RETRY_MAX_SECONDS:
                    backoff = RETRY_FIRST_SECONDS
            log.info("starting %s again in %.0fs", hosted.name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._retry_cap(hosted.spec))

    def _retry_cap(self, spec: node_pb2.ModelSpec) -> float:
        """The longest wait between two tries of a replica. A server attached by URL (an `openai` engine with
        no command) is tried at least every health interval: a try is one request to it, and it serves as
        soon as it answers again, however long it was down; a start costs far more for anything else."""
        if spec.engine == "openai" and not spec.command:
            return min(RETRY_MAX_SECONDS, max(RETRY_FIRST_SECONDS, self._health_seconds))
        return RETRY_MAX_SECONDS

    def _start(self, hosted: HostedModel) -> None:
        hosted.task = self._spawn(self._run_replica(hosted))
        self.changed.set()

    def start(self) -> None:
        """Load the catalog's models (in the background)."""
        for hosted in self.models.values():
            if hosted.task is None:
                self._start(hosted)

    async def _stop_task(self, hosted: HostedModel) -> None:
        """Cancel a replica's loading/watching and wait until it is over (an engine it was starting is
        stopped by then)."""
        task = hosted.task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _unload(self, hosted: HostedModel, why: str) -> None:
        hosted.unloading = True
        self.changed.set()
        await self._stop_task(hosted)
        deadline = time.monotonic() + UNLOAD_GRACE_SECONDS
        while hosted.admitted and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # admitted requests (generations, embeddings) finish first
        engine, hosted.engine = hosted.engine, None
        if engine is not None:
            await asyncio.shield(self._close_engine(engine))
        if self.models.get(hosted.name) is hosted:
            del self.models[hosted.name]
        self.changed.set()
        log.info("model %s unloaded (%s)", hosted.name, why)

    def apply_assignments(self, assignments: Iterable[node_pb2.Assignment]) -> None:
        """Converge on the control plane's desired set: load what is new, unload what is gone, and try
        again a replica that gave up on a permanent error (its assignment came again)."""
        desired = {a.model.name: a for a in assignments}
        for name, hosted in list(self.models.items()):
            if not hosted.assigned or hosted.unloading:
                continue
            wanted = desired.get(name)
            if wanted is None:
                if UNASSIGNED_GRACE_SECONDS <= 0:
                    self._cancel_release(hosted)
                    hosted.unloading = True
                    self._spawn(self._unload(hosted, "no longer assigned"))
                elif hosted.release is None:
                    hosted.release = self._spawn(self._release_later(hosted))
            elif wanted.model != hosted.spec:
                self._cancel_release(hosted)
                hosted.unloading = True  # now, so that the new spec of the same name is loaded below
                self._spawn(self._unload(hosted, "its deployment changed"))
            elif hosted.release is not None:
                self._cancel_release(hosted)
                log.info("model %s is assigned again: it carries on serving", name)
        for name, assignment in desired.items():
            current = self.models.get(name)
            if current is not None and not current.unloading:
                if not current.assigned:
                    log.warning("assignment %s clashes with a catalog model of the same name; ignored", name)
                elif current.task is None or current.task.done():
                    log.info("assignment of %s delivered again: loading it again (it failed: %s)", name, current.error)
                    self._start(current)
                continue
            placement = Placement(assignment.device, tuple(assignment.gpu_indices), assignment.memory_bytes)
            device = assignment.device or "cpu"
            hosted = HostedModel(assignment.model, assigned=True, placement=placement, device=device)
            self.models[name] = hosted
            self._start(hosted)

    async def _release_later(self, hosted: HostedModel) -> None:
        await asyncio.sleep(UNASSIGNED_GRACE_SECONDS)
        if hosted.unloading or self.models.get(hosted.name) is not hosted:
            return
        hosted.release = None  # from here on the unload is under way: a new assignment loads it afresh
        hosted.unloading = True
        await self._unload(hosted, "no longer assigned")

    @staticmethod
    def _cancel_release(hosted: HostedModel) -> None:
        if hosted.release is not None:
            hosted.release.cancel()
            hosted.release = None

    async def close(self) -> None:
        """Stop everything: loads and unloads in progress, then every engine (and its process)."""
        tasks = [*self._tasks, *(h.task for h in self.models.values() if h.task is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for hosted in list(self.models.values()):
            engine, hosted.engine = hosted.engine, None
            if engine is not None:
                self._close_engine(engine)
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

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
    async def serving(
        self, model: str, sequences: int = 1, before_refusal: Callable[[], Awaitable[None]] | None = None
    ) -> AsyncIterator[tuple[HostedModel, Engine]]:
        """Admit one request (a generation of `sequences` choices, or an embedding), or refuse it when the
        replica is full (running + queued at its limits). A request for more choices than the replica
        runs at once can never run: a 400 naming `n`. Nothing here awaits before the request is counted:
        the check and the count are one step of the event loop, so concurrent requests cannot both take
        the last place. A full replica awaits `before_refusal` first, which may refuse the request for a
        reason of its own (one that could never fit the context): only a refusal for being full is counted
        as one (`rejected`, requests_rejected_total)."""
        hosted, engine = self.engine_for(model)
        slots = running_limit(hosted.spec)
        if sequences > slots:
            raise invalid("n", f"n is {sequences}; model '{model}' runs at most {slots} sequences at once per replica")
        if hosted.admitted + sequences > hosted.capacity:
            if before_refusal is not None:
                await before_refusal()
            hosted.rejected += 1
            code = ErrorCode.GPU_OVERLOADED if hosted.device == "gpu" else ErrorCode.NO_CAPACITY
            raise FleetError(
                code,
                f"model '{model}' on this node is full ({hosted.admitted} sequences; limit {hosted.capacity})",
                retry_after_seconds=1,
            )
        hosted.admitted += sequences
        hosted.last_request_at = time.time()
        self.changed.set()
        try:
            yield hosted, engine
        finally:
            hosted.admitted -= sequences
            hosted.last_request_at = time.time()
            self.changed.set()

    # --- reports --------------------------------------------------------------------------------------

    def replicas(self) -> list[node_pb2.Replica]:
        result = []
        for hosted in self.models.values():
            if hosted.unloading:
                continue
            running, queued = hosted.load()
            stamp = timestamp_pb2.Timestamp()
            stamp.FromNanoseconds(int(hosted.last_request_at * 1e9))
            result.append(
                node_pb2.Replica(
                    model=redact_spec(hosted.spec),  # reports are shown to operators: no secret in them
                    state=hosted.state,  # type: ignore[arg-type]
                    error=hosted.error,
                    running_requests=running,
                    queued_requests=queued,
                    last_request_at=stamp,
                    assigned=hosted.assigned,
                    device=hosted.device,
                    rejected_requests=hosted.rejected,
                    context_size=hosted.context_size if hosted.state == node_pb2.REPLICA_STATE_READY else 0,
                )
            )
            if hosted.state == node_pb2.REPLICA_STATE_LOADING:
                _loading(result[-1], hosted)
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
