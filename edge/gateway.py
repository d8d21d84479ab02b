"""The edge's transport-free core: validate, pick a replica from the edge's routing table, call that node.

The HTTP routes and the gRPC servicer are thin adapters over `Gateway`; both get the same routing, the
same retries, the same deadlines and the same errors.

Routing runs here, where requests arrive: the control plane publishes the routing table (`RouteFeed`)
and the edge picks a replica from its copy (`RouteTable`) with no round trip, counting what it has in
flight on each replica. The control plane is asked only for a model with no ready replica (it scales a
deployment from zero), for a model the table does not know (it may be brand new), and while the edge has
no table yet. If the control plane goes away, the edge routes on its last table.

Every call goes through one attempt loop (`Gateway.first_answer`): the best replica, then the next
ones, then the same for the model's `cpu_offload_model` when the replicas refused for load. An attempt is
retried elsewhere only when the node refused before doing anything for the request (full, unloading,
unreachable); once the first event of a stream has come, the request is that node's. A node that cannot
be reached is skipped by the next requests at once (per-node circuit breakers, `edge.breaker`), until a
probe finds it back. The Generate stream, and its continuation on another replica when its node dies
mid-stream, are `edge.generation`'s, over this attempt loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import random
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from edge.access_log import served_by
from edge.breaker import Breakers
from edge.metrics import CURRENT, EdgeMetrics
from edge.node_multiplex import NodeLink
from edge.route_feed import RouteFeed
from edge.route_table import Replica
from fleetlm.controlplane.v1 import routing_pb2, routing_pb2_grpc
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh import request_context
from mesh.channels import CHANNEL_OPTIONS
from mesh.errors import ErrorCode, FleetError
from mesh.fleet_ca import node_dns_name
from mesh.inference_requests import validate_detokenize, validate_embed, validate_tokenize
from mesh.request_context import outgoing
from mesh.tls import TlsFiles, secure_channel

log = logging.getLogger(__name__)

# Errors a node gives before it has done anything for the request: another replica may serve it.
OVERLOADED = {ErrorCode.GPU_OVERLOADED, ErrorCode.NO_CAPACITY}
HEALING = {ErrorCode.BACKEND_UNAVAILABLE, ErrorCode.MODEL_UNAVAILABLE, ErrorCode.MODEL_NOT_FOUND}
RETRYABLE = OVERLOADED | HEALING
CLIENT_DEADLINE_MARGIN_SECONDS = 0.5
# How often an unreachable node's watcher looks at the routing table between its channel's state changes.
NODE_WATCH_SECONDS = 2.0
PREFIX_CHARS = 256  # about 64 tokens: shorter shared prefixes are not worth routing for
# Set by a transport that can show a waiting client how the wait goes (a streamed HTTP request: SSE comments):
# while a request waits for its model to scale from zero, it is called with a line saying where the load is
# (placing, loading on which node and how far, failed and retried), once it has waited WAIT_FIRST_NOTE_SECONDS,
# then at each change and every WAIT_NOTE_SECONDS. Not set: the request waits silently.
WAIT_NOTES: contextvars.ContextVar[Callable[[str], Awaitable[None]] | None] = contextvars.ContextVar(
    "fleetlm_wait_notes", default=None
)
WAIT_NOTE_SECONDS = 5.0
WAIT_FIRST_NOTE_SECONDS = 1.0

T = TypeVar("T")


def prefix_hash(request: inference_pb2.GenerateRequest) -> str:
    """A hash of the prompt's first PREFIX_CHARS characters (of a prompt of token ids, its first
    PREFIX_CHARS // 4 ids: about as many tokens), or "" for a short prompt."""
    which = request.WhichOneof("input")
    if which == "prompt_token_ids":
        ids = request.prompt_token_ids.ids
        if len(ids) < PREFIX_CHARS // 4:
            return ""
        return hashlib.blake2b(str(list(ids[: PREFIX_CHARS // 4])).encode(), digest_size=8).hexdigest()
    if which == "chat":
        text = "".join(f"{m.role}:{m.content}\n" for m in request.chat.messages)
    else:
        text = request.prompt
    if len(text) < PREFIX_CHARS:
        return ""
    return hashlib.blake2b(text[:PREFIX_CHARS].encode(), digest_size=8).hexdigest()


def shutting_down() -> FleetError:
    """What a request still running when the edge's shutdown grace is nearly spent ends with (over HTTP and
    gRPC): a retryable error of the edge's own, never a silent cut."""
    return FleetError(
        ErrorCode.BACKEND_UNAVAILABLE,
        "this edge is shutting down; send the request again (to another edge, or to this one once it is back)",
        retry_after_seconds=1,
    )


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _with_model(request: Any, model: str) -> Any:
    if request.model == model:
        return request
    copy = type(request)()
    copy.CopyFrom(request)
    copy.model = model
    return copy


@dataclass(frozen=True)
class Target:
    node_id: str
    address: str
    stub: inference_pb2_grpc.InferenceServiceStub
    replica: Replica | None = None  # its entry in the routing table, when it was picked from there


@dataclass(frozen=True)
class Route:
    """The replicas to try for one model, best first, and where its overflow goes."""

    targets: list[Target]
    cpu_offload_model: str
    device: str
    probe: str = ""  # the address of a node whose half-open breaker this request probes (the first target)


@dataclass
class _Refusals:
    """What the replicas said when they refused one request."""

    last: FleetError | None = None
    overloaded: FleetError | None = None  # the first refusal for load
    by_nodes: int = 0  # refusals that came from nodes (not from routing)
    attempts: int = 0  # replicas tried for the request so far, in this pass and the ones before

    def add(self, error: FleetError, from_node: bool = True) -> None:
        self.last = error
        self.by_nodes += from_node
        if error.code in OVERLOADED and self.overloaded is None:
            self.overloaded = error

    def may_heal(self) -> bool:
        """Whether another pass soon may find a replica: replicas refused because they were going away
        (unloading, moved, unreachable), not because they were full, and the table may have changed."""
        return self.overloaded is None and self.by_nodes > 0 and self.last is not None and self.last.code in HEALING

    def answer(self, device: str) -> FleetError:
        """The error the client hears when no replica served."""
        if self.overloaded is None:
            assert self.last is not None  # a route names at least one replica
            return self.last
        code = ErrorCode.GPU_OVERLOADED if device == "gpu" else ErrorCode.NO_CAPACITY
        detail = self.overloaded.message
        if self.last is not self.overloaded and self.last is not None and self.last.code not in OVERLOADED:
            detail += f"; then {self.last}"
        return FleetError(code, f"every replica is busy ({detail})", retry_after_seconds=1)


# One attempt: call `target` with the request (its model set to the one being tried). It returns what
# the caller needs to go on, or raises FleetError; only a refusal in RETRYABLE moves to the next replica.
Attempt = Callable[[Any, Target], Awaitable[T]]


def log_failure(request_id: str, error: FleetError) -> None:
    """One line for a request the edge could not place: the fleet's failures loudly, the caller's quietly."""
    if error.http_status >= 500:
        log.warning("request %s failed: %s", request_id, error)
    elif error.http_status == 429:
        log.info("request %s refused: %s", request_id, error)
    else:
        log.debug("request %s rejected: %s", request_id, error)


class Gateway:
    def __init__(
        self,
        controlplanes: str | list[str],
        request_timeout_seconds: float,
        placement_timeout_seconds: float,
        scale_from_zero_timeout_seconds: float = 120.0,
        edge_id: str = "edge",
        breakers: Breakers | None = None,
        failover_seconds: float = 3.0,
        tls: TlsFiles | None = None,
        node_streams: bool = True,
        controlplane_name: str | None = None,
    ) -> None:
        addresses = [controlplanes] if isinstance(controlplanes, str) else list(controlplanes)
        self._controlplanes = [a.strip() for a in addresses if a.strip()]
        # With `tls`, every channel is mutual TLS with the edge's certificate; plaintext without. Control planes
        # dialled by address (a DNS name's records) are verified by `controlplane_name`.
        self._tls = tls
        self._cp_channels = [secure_channel(a, tls, CHANNEL_OPTIONS, controlplane_name) for a in self._controlplanes]
        self._cp_turn = 0  # the control plane that answered last is asked first
        self.feed = RouteFeed(self._cp_channels, edge_id)
        self.breakers = breakers or Breakers()
        self.breakers.on_open = self._watch_node
        self._watchers: dict[str, asyncio.Task[None]] = {}  # address -> the task watching it come back
        self._node_channels: dict[str, grpc.aio.Channel] = {}
        self._node_stubs: dict[str, inference_pb2_grpc.InferenceServiceStub] = {}  # one per channel
        self._node_links: dict[str, NodeLink] = {}  # Generate calls, over one stream per node
        self._node_streams = node_streams  # else a gRPC call per Generate request
        self.request_timeout = request_timeout_seconds
        self._placement_timeout = placement_timeout_seconds
        self._scale_from_zero_timeout = scale_from_zero_timeout_seconds
        self._failover_seconds = failover_seconds
        self.continued_streams = 0  # streams cut by a failed node and continued (or run again) on another replica
        # Set by the edge when its shutdown grace is nearly spent: requests still running end with a 503 (or,
        # a stream that has started, an error event), instead of being cut by the server (edge.server).
        self.stopping = asyncio.Event()
        self._stopped: asyncio.Future[Any] | None = None  # one waiter on `stopping` for every request
        self.metrics: EdgeMetrics | None = None  # set by the edge when metrics are on (edge.metrics)
        from edge.generation import Generation  # it builds on this module: imported once this one is loaded

        self._generation = Generation(self)

    @property
    def controlplane_channels(self) -> list[grpc.aio.Channel]:
        """The channels to the control planes (mutual TLS under TLS), for the edge's other streams to share."""
        return self._cp_channels

    async def run(self) -> None:
        """Follow the control plane's routing table until cancelled (owned by the edge's task group)."""
        await self.feed.run()

    def stopped(self) -> asyncio.Future[Any]:
        """Done once `stopping` is set: one future that every request's until_disconnect waits on (a task
        each would cost every request one more task)."""
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self.stopping.wait())
        return self._stopped

    async def close(self) -> None:
        if self._stopped is not None:
            self._stopped.cancel()
        for watcher in self._watchers.values():
            watcher.cancel()
        for link in self._node_links.values():
            await link.close()
        for channel in self._node_channels.values():
            await channel.close()
        for channel in self._cp_channels:
            await channel.close()

    def _channel(self, node_id: str, address: str) -> grpc.aio.Channel:
        """The channel to a node; over TLS it accepts only the certificate of the node the routing table
        names (`<node_id>.node.fleetlm`, checked by grpc's hostname verification)."""
        channel = self._node_channels.get(address)
        if channel is None:
            name = node_dns_name(node_id) if self._tls is not None else None
            channel = secure_channel(address, self._tls, CHANNEL_OPTIONS, name)
            self._node_channels[address] = channel
        return channel

    def _target(self, node_id: str, address: str, replica: Replica | None = None) -> Target:
        stub = self._node_stubs.get(address)
        if stub is None:  # a stub makes a callable per method: once per channel, not per request
            stub = self._node_stubs[address] = inference_pb2_grpc.InferenceServiceStub(self._channel(node_id, address))
        return Target(node_id, address, stub, replica)

    def open_generate(
        self,
        target: Target,
        request: inference_pb2.GenerateRequest,
        timeout: float,
        metadata: tuple[tuple[str, str], ...],
    ) -> Any:
        """A Generate call to `target`'s node, carried on the edge's stream to it (edge.node_multiplex); it
        reads as a grpc.aio call. Without node streams, a gRPC call of its own."""
        if not self._node_streams:
            return target.stub.Generate(request, timeout=timeout, metadata=metadata)
        link = self._node_links.get(target.address)
        if link is None:
            channel = self._channel(target.node_id, target.address)
            name = f"node {target.node_id} at {target.address}"
            link = self._node_links[target.address] = NodeLink(channel, target.stub, name)
        return link.generate(request, timeout, metadata)

    def _watch_node(self, address: str) -> None:
        """A node's breaker opened: watch its channel, so that it is used again as soon as it answers, with
        or without traffic to probe it (and /health and nodes_unreachable say so at once)."""
        if address in self._watchers or address not in self._node_channels:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._await_node(address))
        except RuntimeError:  # no loop (a unit test of the breaker alone): the probes find it back
            return
        self._watchers[address] = task
        task.add_done_callback(lambda _: self._watchers.pop(address, None))

    async def _await_node(self, address: str) -> None:
        """Until the node's breaker closes: its channel connecting again (grpc reconnects within its backoff,
        at most 2 s apart) after it has been seen down closes the breaker. A channel that stayed connected
        while calls failed is left to the half-open probe, so a node that takes connections but fails calls
        is not let back in by its connection alone. A node that leaves the routing table is forgotten."""
        channel = self._node_channels[address]
        seen_down = False
        while self.breakers.is_open(address):
            if self.feed.synced.is_set() and not self.feed.table.has_address(address):
                self.breakers.forget(address)
                return
            state = channel.get_state(try_to_connect=True)
            if state == grpc.ChannelConnectivity.SHUTDOWN:
                return
            if state == grpc.ChannelConnectivity.READY and seen_down:
                self.breakers.succeeded(address)
                log.info("node at %s answers again: it takes requests", address)
                return
            seen_down = seen_down or state != grpc.ChannelConnectivity.READY
            try:
                await asyncio.wait_for(channel.wait_for_state_change(state), NODE_WATCH_SECONDS)
            except TimeoutError:
                pass

    def _usable(self, replicas: list[Replica]) -> tuple[list[Replica], str]:
        """The replicas a request may go to now, and the address it probes ('' if none).

        A node whose breaker is closed (and whose channel is not known to be failing to connect) is usable.
        Of the nodes whose breaker is open and due for a probe, the first goes FIRST, as this request's
        probe: it fails over to the next replica before its first token if the node is still unreachable,
        so the probe costs the client nothing, and it is tried for certain. (A probe taken for a replica
        listed behind a healthy one was never sent when the healthy one answered: its breaker stayed
        half-open with a probe "in flight" for good, and the node got no traffic from this edge again.)"""
        usable: list[Replica] = []
        probe: Replica | None = None
        for replica in replicas:
            channel = self._node_channels.get(replica.address)
            state = channel.get_state() if channel is not None else None
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE and not self.breakers.is_open(replica.address):
                self.breakers.failed(replica.address)
            if not self.breakers.is_open(replica.address):
                usable.append(replica)
            elif probe is None and self.breakers.allow(replica.address, state == grpc.ChannelConnectivity.READY):
                # allow() took the half-open probe: the cool-down is over, or gRPC, which keeps reconnecting
                # to the node meanwhile, has connected (a node started again is probed at once, not seconds
                # after it came back).
                probe = replica
        return ([probe] if probe is not None else []) + usable, probe.address if probe is not None else ""

    async def _ask_controlplane(self, method: str, request: Any, timeout: float) -> Any:
        """Call the control plane, trying each address in turn while they are unreachable. The call carries
        the request's id and trace context, as a node call does."""
        error: grpc.aio.AioRpcError | None = None
        request_id = request_context.REQUEST_ID.get()
        metadata = outgoing(request_id) if request_id else None
        for i in range(len(self._cp_channels)):
            turn = (self._cp_turn + i) % len(self._cp_channels)
            stub = routing_pb2_grpc.RoutingServiceStub(self._cp_channels[turn])
            try:
                reply = await getattr(stub, method)(request, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED):
                    raise self._control_plane_error(exc) from exc
                error = exc
                continue
            self._cp_turn = turn
            return reply
        assert error is not None
        raise self._control_plane_error(error) from error

    def _control_plane_error(self, exc: grpc.aio.AioRpcError) -> FleetError:
        error = FleetError.from_rpc_error(exc)
        if error.code in (ErrorCode.BACKEND_UNAVAILABLE, ErrorCode.BACKEND_TIMEOUT):
            if FleetError.sent_by_peer(exc) is not None:  # it answered, with a reason of its own (etcd is away)
                return FleetError(error.code, f"the control plane answered: {error.message}", retry_after_seconds=1)
            where = ", ".join(self._controlplanes)
            return FleetError(
                error.code, f"control plane at {where} did not answer ({exc.code().name})", retry_after_seconds=1
            )
        return error

    def node_error(self, exc: grpc.aio.AioRpcError, target: Target, timeout: float) -> FleetError:
        """A failed node call as the client hears it: the node's own error when it sent one (its reason
        and message), else what the transport's status means, naming the node. A node that sent its own
        error is reachable; one the transport could not reach opens its breaker."""
        sent = FleetError.sent_by_peer(exc)
        if sent is not None:
            self.breakers.succeeded(target.address)
            return sent
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            if timeout < self.request_timeout:
                # The client's own deadline, shorter than the edge's: the caller gave up, as when it cancels.
                # Not a slow node, and nothing for an operator's BACKEND_TIMEOUT alerts.
                return FleetError(
                    ErrorCode.CANCELLED,
                    f"the client's deadline ({timeout:.3g}s) passed before node {target.node_id} finished",
                )
            return FleetError(
                ErrorCode.BACKEND_TIMEOUT,
                f"node {target.node_id} did not finish within the request timeout of {timeout:g}s",
            )
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            self.breakers.failed(target.address)
            return FleetError(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"node {target.node_id} is unreachable",  # its address is the fleet's, not the client's to know
                retry_after_seconds=1,
            )
        return FleetError.from_rpc_error(exc)

    # --- routing ----------------------------------------------------------------------------------------

    async def _route(self, model: str, user: str, prefix: str) -> Route:
        """The replicas for one request, best first: from the edge's table when it has a ready replica of
        the model, else from the control plane (scale from zero, a model the table does not know yet, or
        no table at all)."""
        feed = self.feed
        if feed.synced.is_set():
            replicas, reasons = feed.table.pick(model, user, prefix)
            known = feed.models.get(model)
            if replicas:
                reachable, probe = self._usable(replicas)
                if not reachable:
                    names = ", ".join(r.node_id for r in replicas)
                    raise FleetError(
                        ErrorCode.BACKEND_UNAVAILABLE,
                        f"every replica of '{model}' is unreachable ({names}); retrying them shortly",
                        retry_after_seconds=1,
                    )
                if self.metrics is not None:  # a decision that sends the request somewhere
                    self.metrics.routed(model, feed.table.decided)
                return Route(
                    targets=[self._target(r.node_id, r.address, r) for r in reachable],
                    cpu_offload_model=known.cpu_offload_model if known is not None else "",
                    device=reachable[0].device,
                    probe=probe,
                )
            if known is not None and not known.deployed:
                # A model from a node's own catalog: nothing to scale, so the replicas' states are the answer.
                raise FleetError(
                    ErrorCode.MODEL_UNAVAILABLE,
                    f"model '{model}' has no ready replica ({'; '.join(reasons) or 'no live node hosts it'})",
                    retry_after_seconds=5,
                )
        return await self._pick_from_controlplane(model, user, prefix)

    async def _pick_from_controlplane(self, model: str, user: str, prefix: str) -> Route:
        request = routing_pb2.PickReplicaRequest(model=model, user=user, prefix_hash=prefix)
        request.wait_for_ready.FromNanoseconds(int(self._scale_from_zero_timeout * 1e9))
        ask = self._ask_controlplane("PickReplica", request, self._placement_timeout + self._scale_from_zero_timeout)
        notes = WAIT_NOTES.get()
        known = self.feed.models.get(model)
        try:
            if notes is not None and known is not None and known.deployed:
                reply: routing_pb2.PickReplicaResponse = await self._noting_the_wait(model, ask, notes)
            else:
                reply = await ask
        except FleetError as error:
            # With no control plane to ask, a model the table does not know is unknown.
            unknown = self.feed.synced.is_set() and model not in self.feed.models
            if error.code == ErrorCode.BACKEND_UNAVAILABLE and unknown:
                raise self._not_found(model) from error
            raise
        if self.metrics is not None:
            self.metrics.routed(model, "controlplane")
        endpoints = [(reply.node_id, reply.inference_address)]
        endpoints += [(e.node_id, e.inference_address) for e in reply.alternates]
        return Route(
            targets=[
                self._target(node_id, address, self._table_entry(model, node_id)) for node_id, address in endpoints
            ],
            cpu_offload_model=reply.cpu_offload_model,
            device=reply.device or "cpu",
        )

    async def _noting_the_wait(self, model: str, ask: Awaitable[T], note: Callable[[str], Awaitable[None]]) -> T:
        """`ask`'s answer; meanwhile `note` hears where the model's load is, from this edge's routing table,
        at each change and every WAIT_NOTE_SECONDS."""
        asking = asyncio.ensure_future(ask)
        try:
            # Quiet for the first moment: a request refused at once (a deployment that fits nowhere) stays a
            # plain HTTP error, and one whose replica is nearly ready needs no news.
            await asyncio.wait([asking], timeout=WAIT_FIRST_NOTE_SECONDS)
            loop = asyncio.get_running_loop()
            said, said_at = "", 0.0
            while not asking.done():
                changed = asyncio.ensure_future(self.feed.changed().wait())
                try:
                    line = self._wait_note(model)
                    if line != said or loop.time() - said_at >= WAIT_NOTE_SECONDS:  # news, or a keepalive
                        await note(line)
                        said, said_at = line, loop.time()
                    await asyncio.wait(
                        [asking, changed], timeout=WAIT_NOTE_SECONDS, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    changed.cancel()
            return asking.result()
        finally:
            asking.cancel()

    def _wait_note(self, model: str) -> str:
        """One line on where a model that scales from zero is, from the routing table."""
        replicas = self.feed.table.replicas(model)
        if not replicas:
            return f"waiting for a replica of {model} to be placed"
        parts = []
        for r in replicas:
            where = f"{model} on {r.node_id}: {r.state}"
            if r.state == "loading" and r.load_progress is not None:
                where += f" {r.load_progress:.0%}"
            elif r.error:
                where += f" ({r.error})"
            parts.append(where)
        return "; ".join(parts)

    def _table_entry(self, model: str, node_id: str) -> Replica | None:
        return next((r for r in self.feed.table.replicas(model) if r.node_id == node_id), None)

    def _not_found(self, model: str) -> FleetError:
        names = sorted(self.feed.models)
        return FleetError(
            ErrorCode.MODEL_NOT_FOUND,
            f"model '{model}' does not exist; available models: {', '.join(names) or 'none'}",
            param="model",
            metadata={"available_models": ",".join(names)},
        )

    async def first_answer(
        self,
        request: Any,
        request_id: str,
        attempt: Attempt[T],
        timeout: float,
        user: str = "",
        prefix: str = "",
        avoid: frozenset[str] = frozenset(),
    ) -> T:
        """`_one_pass` over the replicas; when every replica refused because it was going away (a drain
        unloading it, a node that died), pass again after a jittered backoff, re-routing from the table as
        it changes, for `failover_seconds` from the end of the first pass (a pass that waited on a node
        that went silent may itself have taken seconds), within the request's own deadline."""
        loop = asyncio.get_running_loop()
        request_deadline = loop.time() + timeout
        deadline: float | None = None
        backoff = 0.05
        attempts = 0
        while True:
            refusals = _Refusals(attempts=attempts)
            try:
                return await self._one_pass(request, request_id, attempt, refusals, user, prefix, avoid)
            except FleetError:
                attempts = refusals.attempts
                if deadline is None:
                    deadline = min(loop.time() + self._failover_seconds, request_deadline)
                pause = backoff * random.uniform(0.5, 1.5)
                if not refusals.may_heal() or loop.time() + pause > deadline:
                    raise
            log.debug("request %s: every replica of %s refused; routing again in %.2fs", request_id, request.model,
                      pause)  # fmt: skip
            await asyncio.sleep(pause)
            backoff = min(backoff * 2, 1.0)

    async def _one_pass(
        self,
        request: Any,
        request_id: str,
        attempt: Attempt[T],
        refusals: _Refusals,
        user: str,
        prefix: str,
        avoid: frozenset[str] = frozenset(),
    ) -> T:
        """Run `attempt` on each replica in turn until one answers: the chosen replica, the next ones,
        then the same for the model's cpu_offload_model when replicas refused for load. A refusal outside
        RETRYABLE is the answer at once; when every replica refused and one of them was full, the answer
        is 429 (GPU_OVERLOADED for GPU replicas, else NO_CAPACITY). Each attempt counts against its
        replica in the routing table while it runs; `attempt` must release it when it fails (`release`).
        Nodes in `avoid` (those that failed a stream being continued) are not tried."""
        model: str = request.model
        tried: set[str] = set()
        device, offload = "cpu", ""
        while model and model not in tried:
            tried.add(model)
            route = await self._route_unless_overloaded(refusals, model, user, prefix)
            if route is not None:
                device, offload = route.device, route.cpu_offload_model
                targets = [t for t in route.targets if t.node_id not in avoid]
                if not targets:
                    names = ", ".join(sorted(avoid))
                    refusals.add(FleetError(ErrorCode.BACKEND_UNAVAILABLE, f"no replica of '{model}' but {names}",
                                            retry_after_seconds=1), from_node=False)  # fmt: skip
                try:
                    for target in targets:
                        if refusals.attempts and self.metrics is not None:
                            self.metrics.series(request.model).retries.inc()
                        refusals.attempts += 1
                        self.acquire(target)
                        # The access log's and the span's node: the one the request is sent to, named also
                        # when its client leaves before the answer; not one that refused it.
                        served_by(target.node_id)
                        try:
                            return await attempt(_with_model(request, model), target)
                        except FleetError as error:
                            served_by("")
                            self.release(target)
                            self._refused(error, request_id, model, target)
                            refusals.add(error)
                        except BaseException:
                            self.release(target)
                            raise
                finally:
                    if route.probe:
                        # A probe that got no verdict (its target was not tried, or the attempt ended in
                        # a timeout or a cancellation): the next request may probe instead.
                        self.breakers.released(route.probe)
            if refusals.overloaded is None or not offload:
                break
            log.info("request %s: every replica of %s is busy; offloading to %s", request_id, model, offload)
            if self.metrics is not None:
                self.metrics.series(request.model).offloads.inc()
            model, offload = offload, ""
        raise refusals.answer(device)

    def acquire(self, target: Target) -> None:
        if target.replica is not None:
            self.feed.table.acquire(target.replica)

    def release(self, target: Target) -> None:
        if target.replica is not None:
            self.feed.table.release(target.replica)

    async def _route_unless_overloaded(self, refusals: _Refusals, model: str, user: str, prefix: str) -> Route | None:
        """The route for `model`, or None when routing fails after a replica was full (an offload model
        with no replica to offer, say): the request's answer is then the overload, not that failure."""
        try:
            return await self._route(model, user, prefix)
        except FleetError as error:
            if refusals.overloaded is None or error.code not in RETRYABLE:
                raise
            refusals.add(error, from_node=False)
            return None

    def _refused(self, error: FleetError, request_id: str, model: str, target: Target) -> None:
        """Log the refusal; re-raise it unless another replica may serve."""
        if error.code not in RETRYABLE:
            raise error
        log.debug("request %s: node %s refused %s (%s); trying the next replica", request_id, target.node_id,
                  model, error)  # fmt: skip

    def bounded_timeout(self, client_timeout: float | None) -> float:
        """The deadline of the work for a request: the edge's --request-timeout, or a gRPC client's own
        deadline with CLIENT_DEADLINE_MARGIN_SECONDS beyond it. The client's deadline ends the call by itself
        (grpc cancels the handler, and the node's call with it); the margin keeps the edge from racing it
        with an answer of its own, so the client hears its DEADLINE_EXCEEDED and the edge counts a cancel."""
        if client_timeout is None:
            return self.request_timeout
        return max(0.001, min(self.request_timeout, client_timeout + CLIENT_DEADLINE_MARGIN_SECONDS))

    # --- calls ------------------------------------------------------------------------------------------

    def generate(
        self,
        request: inference_pb2.GenerateRequest,
        client_timeout: float | None = None,
        first_choice: int = 0,
        whole: bool = False,
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """The node's Generate stream: deltas, then one result, continued on another replica when the node
        dies mid-stream and the deployment opts in (`edge.generation`). Closing it cancels the call.
        `first_choice`: the number of its first choice among its client request's (one prompt of several).
        `whole`: its client waits for the whole reply: held until the result, and run again elsewhere when
        the node fails before it."""
        return self._generation.generate(request, client_timeout, first_choice, whole)

    async def unary(
        self,
        method: str,
        request: Any,
        client_timeout: float | None,
        request_id: str,
        avoid: frozenset[str] = frozenset(),
    ) -> Any:
        timeout = self.bounded_timeout(client_timeout)
        request_id = request_id or new_request_id(method.lower())
        metadata = outgoing(request_id)  # the id and the trace context reach the node

        async def call(attempt: Any, target: Target) -> Any:
            try:
                reply = await getattr(target.stub, method)(attempt, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                raise self.node_error(exc, target, timeout) from exc
            self.breakers.succeeded(target.address)
            self.release(target)
            return reply

        try:
            return await self.first_answer(request, request_id, call, timeout, avoid=avoid)
        except FleetError as error:
            log_failure(request_id, error)
            raise

    def counting(self, model: str) -> None:
        """The running request is for `model`: from now on its metrics are counted under it, if the fleet
        serves that model (a client cannot grow the series by inventing names)."""
        metrics, call = self.metrics, CURRENT.get()
        if metrics is not None and call is not None and model in self.feed.models:
            metrics.serving(call, model)

    async def embed(
        self, request: inference_pb2.EmbedRequest, client_timeout: float | None = None, request_id: str = ""
    ) -> inference_pb2.EmbedResponse:
        """`request_id` names the call in the edge's logs (EmbedRequest has no field for it)."""
        validate_embed(request)
        self.counting(request.model)
        metrics, call = self.metrics, CURRENT.get()
        reply: inference_pb2.EmbedResponse = await self.unary("Embed", request, client_timeout, request_id)
        if metrics is not None and call is not None:
            metrics.serving(call, request.model)  # a node served it: a model of the fleet
            metrics.embedded(call, reply.usage.prompt_tokens)
        return reply

    async def tokenize(
        self, request: inference_pb2.TokenizeRequest, client_timeout: float | None = None, request_id: str = ""
    ) -> inference_pb2.TokenizeResponse:
        validate_tokenize(request)
        reply = await self.unary("Tokenize", request, client_timeout, request_id)
        call = CURRENT.get()
        if self.metrics is not None and call is not None:
            self.metrics.serving(call, request.model)
        return reply  # type: ignore[no-any-return]

    async def detokenize(
        self, request: inference_pb2.DetokenizeRequest, client_timeout: float | None = None, request_id: str = ""
    ) -> inference_pb2.DetokenizeResponse:
        validate_detokenize(request)
        reply = await self.unary("Detokenize", request, client_timeout, request_id)
        call = CURRENT.get()
        if self.metrics is not None and call is not None:
            self.metrics.serving(call, request.model)
        return reply  # type: ignore[no-any-return]

    async def list_models(self) -> list[inference_pb2.ModelInfo]:
        """Every model the fleet knows, from the routing table (the control plane, before the first table)."""
        if self.feed.synced.is_set():
            return self.feed.model_infos()
        reply = await self._ask_controlplane(
            "ListServedModels", routing_pb2.ListServedModelsRequest(), self._placement_timeout
        )
        return list(reply.models)

    def routing_status(self) -> dict[str, Any]:
        """Whether the routing table is fresh, for /health (and operators): the edge routes on a stale
        table when the control plane is away, and says since when."""
        stale = self.feed.stale_seconds
        if not self.feed.synced.is_set():
            state = "none"
        else:
            state = "fresh" if stale is None else "stale"
        status: dict[str, Any] = {"routing_table": state}
        if stale is not None:
            status["routing_table_stale_seconds"] = round(stale, 1)
        open_nodes = self.breakers.open_nodes()
        if open_nodes:
            status["unreachable_nodes"] = open_nodes
        return status
