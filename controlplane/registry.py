"""NodeRegistryService: node agents register under a lease, heartbeat to keep it, and stream their load.

A node heartbeats to one control plane and keeps a `ReportLoad` stream open to every one, so that each
control plane (and the edges that follow it) knows every node's load, not only the load of the nodes that
heartbeat to it. A report goes to the fleet view's load board, in memory, and nowhere else. A heartbeat
carries the node's replicas too, and its model files when they changed (weights copied to the node or
removed): the node's record in etcd is rewritten only when its durable part
(replicas appearing, going, changing state, error or device; the inventory but free RAM) differs from what
this control plane last wrote or from what the view holds. Otherwise the heartbeat only refreshes the
lease: a busy fleet reports several times a second per node, and those reports must not become etcd
writes, nor wake every reader of etcd. Nor etcd requests: the lease is renewed at most every TTL/4 per node
(a node whose lease is gone is out of the fleet view, so its next heartbeat is told to register again all
the same). While a node's stream is open here, the stream is its one source of load (a heartbeat's figures
may be older than the stream's last report, which can overtake it); a node with no stream here (one whose
agent predates ReportLoad, or whose stream is being opened again) reports its load in heartbeats.

A node's reports are stored with their specs redacted: the control plane never needs a report's secrets
(the keys a node uses come to it in its assignments), and a stored report is what operators are shown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from controlplane.fleet import FleetView, durable_key, free_within
from controlplane.join import NodeIdentities
from controlplane.store import ClusterStore, LeaseNotFound, StoreEvent
from fleetlm.controlplane.v1 import node_pb2, registry_pb2, registry_pb2_grpc
from mesh import durations
from mesh.errors import ErrorCode, FleetError, invalid
from mesh.fleet_ca import identity_uri
from mesh.lifecycle import until_set
from mesh.redaction import redact_message
from mesh.tls import peer_certificate, peer_identities

log = logging.getLogger(__name__)

NODE_IDENTITY = identity_uri("node", "-")[:-1]
RESEND_SECONDS = 15.0
# How long a load report for a node this control plane's view does not hold (under the report's lease) waits
# for the view before it is refused: a node that has just registered through another control plane reaches
# this one's view through its etcd watch a moment later.
VIEW_LAG_SECONDS = 5.0


_TIMESTAMP = timestamp_pb2.Timestamp.DESCRIPTOR.full_name
_DURATION = duration_pb2.Duration.DESCRIPTOR.full_name


def _time_out_of_range(message: Message, path: str) -> str:
    """The field path of the first Timestamp or Duration in `message` outside its type's range, or "". A node's
    report is kept in etcd as JSON, which refuses them: found here, it is a 400 naming the field, not an
    internal error at the write."""
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        repeated = field.is_repeated
        for i, item in enumerate(value if repeated else [value]):
            where = f"{path}.{field.name}" + (f"[{i}]" if repeated else "")
            kind = field.message_type.full_name
            if kind == _TIMESTAMP:
                if not durations.timestamp_in_range(item.seconds, item.nanos):
                    return where
            elif kind == _DURATION:
                if not durations.in_range(item):
                    return where
            elif bad := _time_out_of_range(item, where):
                return bad
    return ""


def _check_times(field: str, messages: Iterable[Message]) -> None:
    for i, message in enumerate(messages):
        bad = _time_out_of_range(message, f"{field}[{i}]")
        if bad:
            raise invalid(bad, f"{bad} is not a valid time (out of its type's range)")


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


class NodeRegistry(registry_pb2_grpc.NodeRegistryServiceServicer):
    def __init__(
        self,
        store: ClusterStore,
        fleet: FleetView,
        lease_ttl_seconds: int,
        require_identity: bool = False,
        identities: NodeIdentities | None = None,
    ) -> None:
        self._store = store
        self._identities = identities  # revoked nodes, and certificates superseded by a later join
        # With mutual TLS: a node may register, report and follow assignments only as the node its client
        # certificate names (spiffe://fleetlm/node/<id>), whatever node_id its requests carry.
        self._require_identity = require_identity
        self._fleet = fleet
        self._ttl = lease_ttl_seconds
        fleet.load.max_age_seconds = lease_ttl_seconds  # a node reports at least every TTL/4
        # node_id -> (lease, time.monotonic() of its last renewal here).
        self._renewed: dict[str, tuple[int, float]] = {}
        fleet.listeners.append(self._on_change)
        # node_id -> durable_key of the record this control plane last wrote for it. Compared as well as
        # the view's record, because the view learns of a write only when the watch brings it back: a
        # change that is undone before then must still be written.
        self._written: dict[str, bytes] = {}
        # node_id -> ReportLoad streams from it open here now (while one is, its heartbeats' load is not used).
        self._streams: Counter[str] = Counter()
        # Set at the control plane's stop (`close`): the nodes' streams end then, and the gRPC server stops at
        # once rather than wait out its grace for streams that never end (the nodes' heartbeats are refused
        # meanwhile: a restart of the only control plane took 7 s, and their leases lapsed).
        self._closing = asyncio.Event()
        self._watching: set[asyncio.Event] = set()  # each WatchAssignments stream's wake-up

    async def _as_node(self, context: grpc.aio.ServicerContext, node_id: str) -> None:
        """Refuse (PERMISSION_DENIED / UNAUTHENTICATED, with their ErrorInfo) unless the caller's verified
        certificate is node `node_id`'s (when identities are required)."""
        if not self._require_identity:
            return
        identities = peer_identities(context)
        if identity_uri("node", node_id or "-") in identities:
            cert = peer_certificate(context)
            reason = await self._identities.refusal(node_id, cert.serial_number) if self._identities and cert else ""
            if reason:
                log.warning("node %s refused: %s", node_id, reason)
                raise FleetError(ErrorCode.PERMISSION_DENIED, reason)
            return
        nodes = [i.rsplit("/", 1)[1] for i in identities if i.startswith(NODE_IDENTITY)]
        if not nodes:
            raise FleetError(ErrorCode.UNAUTHENTICATED, "a node needs its fleet certificate (join with a join token)")
        log.warning("node %s refused: its certificate is node %s's", node_id, nodes[0])
        raise FleetError(
            ErrorCode.PERMISSION_DENIED, f"this certificate is node {nodes[0]}'s; it cannot act as {node_id!r}"
        )

    async def RegisterNode(
        self, request: registry_pb2.RegisterNodeRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisterNodeResponse:
        await self._as_node(context, request.node_id)
        if not request.node_id or "/" in request.node_id:
            raise invalid("node_id", "node_id is required and must not contain '/'")
        if not request.inference_address:
            raise invalid("inference_address", "inference_address (host:port) is required")
        _check_times("replicas", request.replicas)
        _check_times("inventory", [request.inventory])
        # Two agents under one id (cloned hosts share a host name, the default id) would take the record from
        # each other at every registration, and each would look healthy. The id is the running node's: one at
        # another address is refused, until that node's lease lapses (a node started again elsewhere).
        running = await self._store.get("node", request.node_id)
        if running is not None and running.inference_address != request.inference_address:
            log.warning(
                "registration refused for node %s at %s: a node registered under that id is running at %s",
                request.node_id,
                request.inference_address,
                running.inference_address,
            )
            raise FleetError(
                ErrorCode.NODE_ID_IN_USE,
                f"a node registered as {request.node_id} is running at {running.inference_address}; give this one"
                f" another --node-id, or stop that one (its registration lapses with its lease, {self._ttl} s)",
                param="node_id",
                retry_after_seconds=self._ttl,
            )
        # The lease's TTL runs from the grant: when it was asked for, not when the record is written after
        # it (an etcd write can take a while on a busy machine), is the time its renewals count from.
        granted_at = time.monotonic()
        lease_id = await self._store.grant_lease(self._ttl)
        replicas = [redact_message(r) for r in request.replicas]
        now = _now()
        node = node_pb2.Node(
            node_id=request.node_id,
            inference_address=request.inference_address,
            inventory=request.inventory,
            replicas=replicas,
            registered_at=now,
            last_heartbeat_at=now,
            lease_id=lease_id,
            lease_ttl_seconds=self._ttl,
            agent_version=request.agent_version,
        )
        await self._store.put("node", node, lease_id)
        self._written[node.node_id] = durable_key(node)
        self._renewed[node.node_id] = (lease_id, granted_at)
        self._fleet.report_load(node.node_id, replicas, node.inventory.ram.free_bytes, now)
        for replica in replicas:
            if not replica.assigned and self._fleet.models.get(replica.model.name) != replica.model:
                await self._store.put("model", replica.model)
        log.info(
            "registered node %s at %s (%d models, lease %x)",
            node.node_id,
            node.inference_address,
            len(node.replicas),
            lease_id,
        )
        return registry_pb2.RegisterNodeResponse(
            lease_id=lease_id,
            lease_ttl=duration_pb2.Duration(seconds=self._ttl),
            heartbeat_interval=duration_pb2.Duration(nanos=0, seconds=max(1, self._ttl // 4)),
        )

    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.HeartbeatResponse:
        await self._as_node(context, request.node_id)
        expired = FleetError(ErrorCode.LEASE_EXPIRED, f"node {request.node_id} is not registered; register again")
        lease, renewed_at = self._renewed.get(request.node_id, (0, 0.0))
        # Renewed within TTL/4: the lease has at least 3/4 of its TTL left, and cannot have lapsed; one that
        # was revoked has taken the node's record with it, which the view check below sees. The time of a
        # renewal is taken before the call: etcd renews it at some point during the call, never before.
        if lease != request.lease_id or time.monotonic() - renewed_at >= self._ttl / 4:
            asked_at = time.monotonic()
            if not await self._store.refresh_lease(request.lease_id):
                self._forget_lease(request.node_id, request.lease_id)
                raise expired
            self._renewed[request.node_id] = (request.lease_id, asked_at)
        node = self._fleet.nodes.get(request.node_id)
        if node is None or node.lease_id != request.lease_id:
            # The view may not have the record of a registration made a moment ago (the node's first
            # heartbeat after it registered again): etcd's is the answer before one is refused.
            node = await self._store.get("node", request.node_id)
        if node is None or node.lease_id != request.lease_id:
            self._forget_lease(request.node_id, request.lease_id)
            raise expired
        _check_times("replicas", request.replicas)
        now = _now()
        replicas = [redact_message(r) for r in request.replicas]
        streamed = self._streams[request.node_id] > 0
        if not streamed:
            # Load first, so that the watch event of a write below already finds it on the board.
            self._fleet.report_load(request.node_id, replicas, request.ram_free_bytes, now)
        updated = node_pb2.Node()
        updated.CopyFrom(node)
        del updated.replicas[:]
        updated.replicas.extend(replicas)
        if request.HasField("model_files"):  # weights copied to the node, or removed, since it registered
            del updated.inventory.model_files[:]
            updated.inventory.model_files.extend(request.model_files.files)
        updated.inventory.ram.free_bytes = free_within(request.ram_free_bytes, updated.inventory)
        updated.last_heartbeat_at.CopyFrom(now)
        key = durable_key(updated)
        if key != self._written.get(request.node_id) or key != durable_key(node):
            try:
                await self._store.put("node", updated, request.lease_id)
            except LeaseNotFound:  # revoked since its last renewal here (within TTL/4)
                self._forget_lease(request.node_id, request.lease_id)
                raise expired from None
            self._written[request.node_id] = key
        return registry_pb2.HeartbeatResponse(load_streamed=streamed)

    def close(self) -> None:
        """End every node's streams here now (at shutdown: the nodes open them again, elsewhere or here)."""
        self._closing.set()
        for changed in self._watching:
            changed.set()

    async def ReportLoad(
        self, request_iterator: AsyncIterator[registry_pb2.ReportLoadRequest], context: grpc.aio.ServicerContext
    ) -> registry_pb2.ReportLoadResponse:
        """One node's load, report after report, into the load board. Refused (the stream ends with the
        error) for a report that does not come from the node's current registration."""
        node_id = ""
        try:
            async for report in until_set(self._closing, request_iterator):
                if not node_id:
                    if not report.node_id:
                        raise invalid("node_id", "a load report must name its node")
                    await self._as_node(context, report.node_id)
                    node_id = report.node_id
                    self._streams[node_id] += 1
                    self._fleet.load.stream_opened(node_id)
                elif report.node_id != node_id:
                    raise invalid(
                        "node_id", f"a load stream carries one node's reports: {node_id}, not {report.node_id}"
                    )
                if not report.lease_id:
                    raise invalid("lease_id", "a load report must carry the lease_id its node registered with")
                if not await self._registered_under(node_id, report.lease_id):
                    raise FleetError(
                        ErrorCode.LEASE_EXPIRED, f"node {node_id} is not registered under lease {report.lease_id:x}"
                    )
                _check_times("replicas", report.replicas)
                replicas = [redact_message(r) for r in report.replicas]
                self._fleet.report_load(node_id, replicas, report.ram_free_bytes, _now())
        except FleetError as error:
            # The error interceptor wraps unary responses and server streams only: a client stream says its
            # error itself, in the same shape (a status with an ErrorInfo).
            await context.abort(error.grpc_code, error.message, trailing_metadata=error.grpc_trailing_metadata())
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            log.exception("load stream from node %s failed", node_id or "(unnamed)")
            internal = FleetError(ErrorCode.INTERNAL, "internal error; see the server log")
            await context.abort(
                internal.grpc_code, internal.message, trailing_metadata=internal.grpc_trailing_metadata()
            )
        finally:
            if node_id:
                self._streams[node_id] -= 1
                if self._streams[node_id] <= 0:
                    del self._streams[node_id]
                    self._fleet.load.stream_closed(node_id)
        return registry_pb2.ReportLoadResponse()

    async def _registered_under(self, node_id: str, lease_id: int) -> bool:
        """Whether the view holds the node's record under this lease, waiting (VIEW_LAG_SECONDS at most) for a
        registration it has not seen yet."""

        def holds() -> bool:
            node = self._fleet.nodes.get(node_id)
            return node is not None and node.lease_id == lease_id

        return holds() or bool(await self._fleet.wait_for(holds, VIEW_LAG_SECONDS))

    async def DeregisterNode(
        self, request: registry_pb2.DeregisterNodeRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeregisterNodeResponse:
        await self._as_node(context, request.node_id)
        self._fleet.departing(request.node_id)  # the deletion of its record is the node leaving, not a lapse
        await self._store.revoke_lease(request.lease_id)
        self._forget(request.node_id)
        log.info("node %s deregistered", request.node_id)
        return registry_pb2.DeregisterNodeResponse()

    def _on_change(self, event: StoreEvent | None) -> None:
        if event is not None and event.kind == "node" and event.value is None:
            self._forget(event.key)  # its lease is gone: what was written under it no longer stands

    def _forget_lease(self, node_id: str, lease_id: int) -> None:
        """A heartbeat under a lease that no longer holds the node's record: forget that lease's renewal.
        Only that one: a heartbeat sent long ago under an older lease (held up on a connection the network
        cut) must not make this control plane forget the renewal of the lease the node registered under
        since."""
        if node_id in self._renewed and self._renewed[node_id][0] == lease_id:
            del self._renewed[node_id]

    def _forget(self, node_id: str) -> None:
        self._written.pop(node_id, None)
        self._renewed.pop(node_id, None)

    async def WatchAssignments(
        self, request: registry_pb2.WatchAssignmentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.WatchAssignmentsResponse]:
        """The node's whole desired state now, then after every change to it, and again every
        RESEND_SECONDS whether it changed or not, so that a lost message heals and a replica that stopped on
        a permanent error is tried again. Only this node's assignments (or a full resync) wake the stream:
        the fleet's other events (every node's reports) cost it nothing."""
        await self._as_node(context, request.node_id)
        changed = asyncio.Event()
        mine = f"{request.node_id}/"

        def on_change(event: StoreEvent | None) -> None:
            if event is None or (event.kind == "assignment" and event.key.startswith(mine)):
                changed.set()

        self._fleet.listeners.append(on_change)
        self._watching.add(changed)
        loop = asyncio.get_running_loop()
        try:
            last: list[bytes] | None = None
            resend_at = loop.time() + RESEND_SECONDS
            while not self._closing.is_set():
                # Cleared before the assignments are read, not after they are sent: the yield waits for the
                # message to go out, and a change in that time (the reconciler placing a replica on a node
                # that has just registered again, whose first message said "nothing") must wake the next
                # pass, not wait for the resend while the node's unassigned grace runs out.
                changed.clear()
                current = sorted(self._fleet.node_assignments(request.node_id), key=lambda a: a.model.name)
                encoded = [a.SerializeToString(deterministic=True) for a in current]
                if encoded != last:
                    last = encoded
                    yield registry_pb2.WatchAssignmentsResponse(assignments=current)
                try:
                    # A fixed deadline, not one that starts over at each change; and not asyncio.wait_for,
                    # which on Python 3.11 swallows a cancellation that arrives with a change.
                    async with asyncio.timeout(max(0.0, resend_at - loop.time())):
                        await changed.wait()
                except TimeoutError:
                    last = None  # resend even if unchanged
                    resend_at = loop.time() + RESEND_SECONDS
        finally:
            self._fleet.listeners.remove(on_change)
            self._watching.discard(changed)
