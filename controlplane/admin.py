"""AdminService: the operators' RPCs. Thin: reads come from the store or the fleet view, decisions
from the placement functions, writes go through the reconciler.

With several control planes, reads are answered by whichever control plane is asked, and writes are made by
the leader: a follower forwards them to it (`_forward`) and returns its reply or its error unchanged, so an
operator may point grpcurl at any control plane. Under TLS the follower calls the leader over mutual TLS with
its own certificate (a fleet certificate is a client certificate too), checking the leader's against the
address the leader advertises. While an election is under way a write is refused with
BACKEND_UNAVAILABLE (gRPC UNAVAILABLE) and a Retry-After; nothing is written.

Every reply goes out through `_shown`: a spec's secrets (an engine's api-key, a hub token) stay in etcd,
where the nodes read them, and are never returned to an operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from controlplane import placement, routing
from controlplane.api_keys import ApiKeys, AuthSettings
from controlplane.etcd_store import EtcdStore
from controlplane.fleet import FleetView
from controlplane.quota import Quotas
from controlplane.reconciler import Reconciler
from controlplane.store import ClusterStore, FencedOut, record_key
from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from mesh import durations
from mesh.auth import AdminGuard, read_admin_token, read_secret_file
from mesh.catalog import ENGINE_FORMATS, model_name_problem
from mesh.channels import CHANNEL_OPTIONS
from mesh.errors import ErrorCode, FleetError, invalid, required
from mesh.lifecycle import until_set
from mesh.redaction import REDACTED, redact_message, redacted_fields, secret_values
from mesh.tls import TlsFiles, peer_identities, secure_channel

R = TypeVar("R", bound=Message)

FORWARDED = "x-fleetlm-forwarded-by"  # metadata on a write one control plane sends to the leader
FORWARD_TIMEOUT_SECONDS = 30.0  # a DeployModel runs a reconcile pass on the leader: seconds, not minutes
MAX_GPU_COUNT = 64  # GPUs one replica may span: the catalog's bound (mesh.catalog.ModelEntry.gpu_count)


def validate_deployment(deployment: node_pb2.Deployment) -> node_pb2.Deployment:
    """A normalised copy, or a 400 naming the field."""
    spec = deployment.spec
    problem = model_name_problem(spec.name)
    if problem:
        raise invalid("deployment.spec.name", problem)
    if not spec.path:
        raise invalid("deployment.spec.path", "a deployment needs the path of its weights on the nodes")
    if spec.format not in placement.ENGINE_FOR_FORMAT:
        raise invalid("deployment.spec.format", "format must be one of gguf, hf, awq")
    if spec.engine and spec.engine not in ENGINE_FORMATS:  # a value no engine has, not a format no node can run
        known = ", ".join(ENGINE_FORMATS)
        raise invalid("deployment.spec.engine", f"engine must be one of {known}; got {spec.engine!r}")
    if spec.device not in ("", "cpu", "gpu", "any"):
        raise invalid("deployment.spec.device", "device must be one of cpu, gpu, any")
    attached = placement.engine_of(spec) == "openai" and not spec.command  # its path is the server's URL
    if not attached and not spec.path.startswith("/"):
        # Nodes report their weights by absolute paths: a relative one matches none, and was NO_CAPACITY on
        # every node ("model file not found") with a retry that could never succeed.
        raise invalid(
            "deployment.spec.path",
            f"the weights' path must be absolute, as the nodes see it (e.g. /models/x.gguf); got {spec.path!r}",
        )
    # Fields with presence: set means set. A 0 the engine cannot honour is refused, never replaced by the default
    # that only an unset field stands for.
    if spec.HasField("max_running_requests") and spec.max_running_requests < 1:
        raise invalid(
            "deployment.spec.max_running_requests",
            "max_running_requests must be at least 1 (leave it unset for the engine's default)",
        )
    if spec.HasField("gpu_count") and not 1 <= spec.gpu_count <= MAX_GPU_COUNT:
        raise invalid(
            "deployment.spec.gpu_count",
            f"gpu_count must be between 1 and {MAX_GPU_COUNT} (leave it unset for 1); got {spec.gpu_count}",
        )
    placeholders = redacted_fields(spec)
    if placeholders:
        raise invalid(
            f"deployment.spec.{placeholders[0]}",
            f"{placeholders[0]} holds '{REDACTED}', which AdminService shows in place of a secret;"
            " send the secret itself",
        )
    reason = placement.check_format(spec)
    if reason:
        raise FleetError(ErrorCode.FORMAT_NOT_SUPPORTED, f"model '{spec.name}': {reason}", param="deployment.spec")
    for field, duration in (("idle_timeout", deployment.idle_timeout), ("spec.startup_timeout", spec.startup_timeout)):
        if not durations.non_negative(duration):
            raise invalid(f"deployment.{field}", f"{field} must be a duration from 0 to {durations.MAX_SECONDS} s")
    if spec.HasField("startup_timeout") and not (spec.startup_timeout.seconds or spec.startup_timeout.nanos):
        raise invalid(
            "deployment.spec.startup_timeout",
            "startup_timeout must be greater than 0 (leave it unset for the engine's default)",
        )
    if deployment.max_replicas and deployment.max_replicas < deployment.min_replicas:
        raise invalid("deployment.max_replicas", "max_replicas must be at least min_replicas")
    if deployment.cpu_offload_model == spec.name:  # another deployment, which may be made after this one
        raise invalid("deployment.cpu_offload_model", "cpu_offload_model names another deployment, not this one")
    out = node_pb2.Deployment()
    out.CopyFrom(deployment)
    out.spec.engine = placement.engine_of(spec)
    out.spec.device = spec.device or "any"
    out.spec.context_size = spec.context_size or 2048
    out.max_replicas = max(deployment.max_replicas, deployment.min_replicas, 1)
    out.replicas = deployment.min_replicas
    if not out.HasField("created_at"):
        out.created_at.CopyFrom(timestamp_pb2.Timestamp())
        out.created_at.GetCurrentTime()
    return out


def _differences(pinned: node_pb2.ModelSpec, spec: node_pb2.ModelSpec) -> str:
    """How a model a node pins would answer otherwise than a deployment's replicas (`spec` validated):
    other weights, another engine or another context. Empty when it answers alike."""
    theirs = (pinned.path, pinned.format, placement.engine_of(pinned), pinned.context_size or 2048)
    ours = (spec.path, spec.format, spec.engine, spec.context_size)
    fields = ("path", "format", "engine", "context_size")
    return ", ".join(f"{f} {a}, not {b}" for f, a, b in zip(fields, theirs, ours, strict=True) if a != b)


def reapplied(deployment: node_pb2.Deployment, existing: node_pb2.Deployment | None) -> node_pb2.Deployment:
    """`deployment` (validated) as it replaces `existing`: a deployment sent again keeps the replicas it runs
    now, moved into its new [min_replicas, max_replicas]; only a new one starts at min_replicas. (Re-sending
    the same DeployModel reset a deployment scaled to 2 to its min of 1 and unloaded a serving replica.)"""
    if existing is not None:
        deployment.replicas = min(max(existing.replicas, deployment.min_replicas), deployment.max_replicas)
    return deployment


log = logging.getLogger(__name__)

_RPCS = list(admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods_by_name)


class Admin(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        store: ClusterStore,
        fleet: FleetView,
        reconciler: Reconciler,
        keys: ApiKeys | None = None,
        guard: AdminGuard | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self._store = store
        self._tls = tls  # this control plane's own certificate: it forwards writes to the leader with it
        self._fleet = fleet
        self._reconciler = reconciler
        self._leadership = reconciler.leadership
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._quotas = Quotas()
        self._following: asyncio.Task[None] | None = None
        self._own_credential = ""  # the admin token, for writes this control plane forwards on its own behalf
        self._closing = asyncio.Event()  # set at the stop: the edges' WatchApiKeys streams end (`end_streams`)
        if keys is None or guard is None:
            # Interim, until the server passes them: from FLEETLM_CP_AUTH_SECRET_FILE / _ADMIN_TOKEN_FILE.
            settings = AuthSettings(**{})  # from the environment alone
            secret = read_secret_file(settings.auth_secret_file, "auth secret") if settings.auth_secret_file else None
            token = read_admin_token(settings.admin_token_file) if settings.admin_token_file else None
            keys = keys or (ApiKeys(store, secret) if isinstance(store, EtcdStore) else None)
            guard = guard or AdminGuard(token, secret, tls=tls is not None)
            self._own_credential = token or ""
        self._keys = keys
        self._guard = guard
        if keys is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: a unit test that follows nothing
                self._following = asyncio.get_running_loop().create_task(keys.follow())
        for name in _RPCS:  # every RPC checks the caller's credential first (reflection and health are apart)
            setattr(self, name, self._checked(name, getattr(self, name)))

    def _checked(self, name: str, method: Any) -> Any:
        full = f"/fleetlm.controlplane.v1.AdminService/{name}"
        guard = self._guard
        if inspect.isasyncgenfunction(method):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                guard.check(full, context.invocation_metadata(), peer_identities(context))
                async for reply in method(request, context):
                    yield reply

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            guard.check(full, context.invocation_metadata(), peer_identities(context))
            return await method(request, context)

        return unary

    def end_streams(self) -> None:
        """End the edges' WatchApiKeys streams now (at shutdown: each opens its stream again elsewhere)."""
        self._closing.set()

    async def close(self) -> None:
        if self._following is not None:
            self._following.cancel()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    # --- writes: made by the leader ---------------------------------------------------------------------

    async def _forward(self, method: str, request: Message, context: grpc.aio.ServicerContext | None) -> Any:
        """None when this control plane leads (or is the only one): the caller makes the write here. Else
        the leader's reply to the same request, or its error as a FleetError."""
        leadership = self._leadership
        if leadership is None or leadership.is_leader:
            return None
        metadata = dict(context.invocation_metadata() or ()) if context is not None else {}
        if FORWARDED in metadata:  # never forward twice: two control planes that disagree would loop
            raise _no_leader(f"{leadership.address} was sent a write by {metadata[FORWARDED]} but does not lead")
        address = leadership.leader_address
        if not address:
            raise _no_leader("no control plane leads right now (an election is under way)")
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = secure_channel(address, self._tls, CHANNEL_OPTIONS)
        call = getattr(admin_pb2_grpc.AdminServiceStub(channel), method)
        try:
            # The caller's own credential goes along: the leader checks it as it would the caller's.
            passed = [(FORWARDED, leadership.address)]
            if "authorization" in metadata:
                passed.append(("authorization", metadata["authorization"]))
            elif self._own_credential:  # a write of its own (scale from zero for PickReplica)
                passed.append(("authorization", f"Bearer {self._own_credential}"))
            return await call(request, timeout=FORWARD_TIMEOUT_SECONDS, metadata=tuple(passed))
        except grpc.aio.AioRpcError as error:
            sent = FleetError.sent_by_peer(error)
            if sent is not None:
                raise sent from None
            raise _no_leader(f"the leader at {address} did not answer ({error.code().name})") from None

    @contextlib.asynccontextmanager
    async def _leading(self) -> AsyncIterator[None]:
        """A write in the leader's role: if the leadership ends under it, the client hears so (nothing more
        was written) instead of an internal error."""
        try:
            yield
        except FencedOut as exc:
            if self._leadership is not None:
                self._leadership.step_down(f"a fenced write was refused ({exc})")
            raise _no_leader("this control plane stopped leading during the write") from None

    async def ensure_replica(self, name: str) -> None:
        """Scale from zero, on the leader wherever it is asked (PickReplica on any control plane)."""
        request = admin_pb2.EnsureReplicaRequest(name=name)
        if await self._forward("EnsureReplica", request, None) is None:
            async with self._leading():
                await self._reconciler.ensure_one(name)

    async def EnsureReplica(
        self, request: admin_pb2.EnsureReplicaRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.EnsureReplicaResponse:
        self._deployment(request.name)
        if (forwarded := await self._forward("EnsureReplica", request, context)) is not None:
            return forwarded  # type: ignore[no-any-return]
        async with self._leading():
            await self._reconciler.ensure_one(request.name)
        return admin_pb2.EnsureReplicaResponse()

    async def GetLeader(
        self, request: admin_pb2.GetLeaderRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetLeaderResponse:
        if self._leadership is None:
            return admin_pb2.GetLeaderResponse(is_leader=True)
        leader, revision = self._leadership.describe()
        return admin_pb2.GetLeaderResponse(
            leader_address=leader,
            address=self._leadership.address,
            is_leader=self._leadership.is_leader,
            fencing_revision=revision,
        )

    def _shown(self, reply: R) -> R:
        """The reply with every spec in it redacted, and every secret the fleet knows of cut out of its text
        (an engine that printed its key into a replica's error, say)."""
        specs = [d.spec for d in self._fleet.deployments.values()]
        specs += [a.model for a in self._fleet.assignments.values()]
        return redact_message(reply, set().union(*map(secret_values, specs)))

    def _with_scheduling(self, node: node_pb2.Node) -> node_pb2.Node:
        out = node_pb2.Node()
        out.CopyFrom(self._fleet.load.overlay(node))  # etcd holds durable state; load is in memory
        out.scheduling = self._fleet.scheduling(node.node_id)  # type: ignore[assignment]
        over = self._reconciler.overcommit(node.node_id)
        out.overcommitted = over.reason if over is not None else ""
        return out

    def _live_node(self, node_id: str) -> node_pb2.Node:
        required(node_id, "node_id")
        node = self._fleet.nodes.get(node_id)
        if node is None:
            raise FleetError(ErrorCode.NODE_NOT_FOUND, f"node '{node_id}' is not registered", param="node_id")
        return node

    def _pinned(self, name: str) -> list[tuple[str, node_pb2.ModelSpec]]:
        """(node id, spec) of every live node whose own catalog (--catalog) pins a model `name`."""
        return sorted(((n.node_id, r.model) for n in self._fleet.nodes.values() for r in n.replicas
                       if r.model.name == name and not r.assigned), key=lambda pin: pin[0])  # fmt: skip

    def _pinned_by(self, name: str, nodes: list[str]) -> str:
        """How DeployModel and UndeployModel name the nodes whose own catalog pins `name`."""
        return f"'{name}' is pinned by the catalog of node {', '.join(nodes)} (--catalog)"

    def _deployment(self, name: str) -> node_pb2.Deployment:
        required(name, "name")
        deployment = self._fleet.deployments.get(name)
        if deployment is None:
            known = ", ".join(sorted(self._fleet.deployments)) or "none"
            raise FleetError(
                ErrorCode.MODEL_NOT_FOUND, f"no deployment named '{name}'; deployments: {known}", param="name"
            )
        return deployment

    # --- nodes ----------------------------------------------------------------------------------------

    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListNodesResponse:
        # From etcd, not the cached view: an operator asking wants the authoritative answer.
        nodes = sorted(await self._store.list("node"), key=lambda n: n.node_id)
        return self._shown(admin_pb2.ListNodesResponse(nodes=[self._with_scheduling(n) for n in nodes]))

    async def GetNode(
        self, request: admin_pb2.GetNodeRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetNodeResponse:
        required(request.node_id, "node_id")
        node = await self._store.get("node", request.node_id)
        if node is None:
            raise FleetError(ErrorCode.NODE_NOT_FOUND, f"node '{request.node_id}' is not registered", param="node_id")
        return self._shown(admin_pb2.GetNodeResponse(node=self._with_scheduling(node)))

    async def _set_scheduling(self, node_id: str, scheduling: int) -> None:
        self._live_node(node_id)
        record = node_pb2.Node(node_id=node_id, scheduling=scheduling)  # type: ignore[arg-type]
        async with self._leading():
            if scheduling == node_pb2.SCHEDULING_ACTIVE:
                await self._store.delete("scheduling", node_id, fence=self._reconciler.fence())
                self._fleet.records["scheduling"].pop(node_id, None)
            else:
                await self._store.put("scheduling", record, fence=self._reconciler.fence())
                self._fleet.records["scheduling"][node_id] = record
        self._reconciler.kick()

    async def CordonNode(
        self, request: admin_pb2.CordonNodeRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CordonNodeResponse:
        required(request.node_id, "node_id")  # checked before forwarding: refused whoever leads
        if (forwarded := await self._forward("CordonNode", request, context)) is not None:
            return forwarded  # type: ignore[no-any-return]
        await self._set_scheduling(request.node_id, node_pb2.SCHEDULING_CORDONED)
        return self._shown(admin_pb2.CordonNodeResponse())

    async def UncordonNode(
        self, request: admin_pb2.UncordonNodeRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.UncordonNodeResponse:
        required(request.node_id, "node_id")  # checked before forwarding: refused whoever leads
        if (forwarded := await self._forward("UncordonNode", request, context)) is not None:
            return forwarded  # type: ignore[no-any-return]
        await self._set_scheduling(request.node_id, node_pb2.SCHEDULING_ACTIVE)
        return self._shown(admin_pb2.UncordonNodeResponse())

    async def DrainNode(
        self, request: admin_pb2.DrainNodeRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DrainNodeResponse:
        required(request.node_id, "node_id")  # checked before forwarding: refused whoever leads
        if (forwarded := await self._forward("DrainNode", request, context)) is not None:
            return forwarded  # type: ignore[no-any-return]
        await self._set_scheduling(request.node_id, node_pb2.SCHEDULING_DRAINING)
        moving = len(self._fleet.node_assignments(request.node_id))
        return self._shown(admin_pb2.DrainNodeResponse(replicas_to_move=moving))

    # --- models and deployments -----------------------------------------------------------------------

    async def ListModels(
        self, request: admin_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListModelsResponse:
        nodes = {n.node_id: n for n in await self._store.list("node")}
        specs = {m.name: m for m in await self._store.list("model")}
        deployed = {d.spec.name: d.spec for d in await self._store.list("deployment")}
        assignments = {record_key("assignment", a) for a in await self._store.list("assignment")}
        specs.update(deployed)
        statuses = []
        for info in routing.model_infos(nodes, specs, deployed, assignments):
            candidates = routing.candidates_for(nodes.values(), info.name, deployed, assignments)
            spec = specs.get(info.name) or candidates[0].replica.model
            replicas = [
                admin_pb2.ModelReplica(node_id=c.node.node_id, state=c.replica.state, error=c.replica.error)
                for c in candidates
            ]
            statuses.append(admin_pb2.ModelStatus(spec=spec, info=info, replicas=replicas))
        return self._shown(admin_pb2.ListModelsResponse(models=statuses))

    async def DeployModel(
        self, request: admin_pb2.DeployModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DeployModelResponse:
        deployment = validate_deployment(request.deployment)
        if (forwarded := await self._forward("DeployModel", request, context)) is not None:
            return forwarded  # type: ignore[no-any-return]
        name = deployment.spec.name
        # A node that pins a model of this name from its own catalog serves it as that name: with other
        # weights or another context, clients of the deployment would get either (the edge routes by name;
        # a pinned replica of a deployment's name is left out of the routes, routing.routed, but it was
        # routed before the deployment was made, and is again once the deployment goes).
        differing = [(node_id, d) for node_id, pin in self._pinned(name) if (d := _differences(pin, deployment.spec))]
        if differing:
            raise invalid(
                "deployment.spec.name",
                f"{self._pinned_by(name, [node_id for node_id, _ in differing])} with another spec"
                f" ({differing[0][1]}): one name would stand for two models; remove it from that catalog, or choose"
                " another name",
            )
        # Dry run first: a deployment that fits nowhere is refused with every node's reason. A change to a
        # deployment is judged without its own replicas, which the new ones replace.
        placement.place(deployment.spec, self._reconciler.snapshots(without=name), self._reconciler.policy)
        deployment = reapplied(deployment, self._fleet.deployments.get(name))
        async with self._leading():
            await self._reconciler.save_deployment(deployment)
            await self._reconciler.reconcile()
        assignments = [a for a in self._fleet.assignments.values() if a.model.name == deployment.spec.name]
        return self._shown(admin_pb2.DeployModelResponse(deployment=deployment, assignments=assignments))

    async def UndeployModel(
        self, request: admin_pb2.UndeployModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.UndeployModelResponse:
        if request.name and request.name not in self._fleet.deployments and request.name in self._fleet.models:
            # A model a node pinned from its own catalog (--catalog), known to the fleet after that node left
            # (kept, so that its clients hear 'unavailable', not 'unknown', while the node is away): forgotten
            # at the operator's word once no live node pins it.
            pinned = [node_id for node_id, _ in self._pinned(request.name)]
            if pinned:
                raise invalid(
                    "name", f"{self._pinned_by(request.name, pinned)}, not a deployment: remove it from that catalog"
                )
            if (forwarded := await self._forward("UndeployModel", request, context)) is not None:
                return forwarded  # type: ignore[no-any-return]
            async with self._leading():
                await self._store.delete("model", request.name, fence=self._reconciler.fence())
                self._fleet.models.pop(request.name, None)
            log.info("model %s, which no live node pins any more, forgotten", request.name)
            return self._shown(admin_pb2.UndeployModelResponse())
        self._deployment(request.name)
        if (forwarded := await self._forward("UndeployModel", request, context)) is not None:
            return forwarded  # type: ignore[no-any-return]
        async with self._leading():
            await self._reconciler.remove_deployment(request.name)
            await self._reconciler.reconcile()
        return self._shown(admin_pb2.UndeployModelResponse())

    async def ListDeployments(
        self, request: admin_pb2.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListDeploymentsResponse:
        statuses = []
        for name in sorted(self._fleet.deployments):
            assignments = [a for a in self._fleet.assignments.values() if a.model.name == name]
            replicas = []
            for a in assignments:
                replica = self._reconciler.replica_of(a)
                state = replica.state if replica else node_pb2.REPLICA_STATE_PENDING
                replicas.append(
                    admin_pb2.ModelReplica(node_id=a.node_id, state=state, error=replica.error if replica else "")
                )
            statuses.append(
                admin_pb2.DeploymentStatus(
                    deployment=self._fleet.deployments[name], assignments=assignments, replicas=replicas
                )
            )
        return self._shown(admin_pb2.ListDeploymentsResponse(deployments=statuses))

    async def ScaleDeployment(
        self, request: admin_pb2.ScaleDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ScaleDeploymentResponse:
        deployment = self._deployment(request.name)
        if not deployment.min_replicas <= request.replicas <= deployment.max_replicas:
            raise invalid(
                "replicas",
                f"replicas must be between min_replicas ({deployment.min_replicas}) and max_replicas"
                f" ({deployment.max_replicas}); got {request.replicas}",
            )
        if (forwarded := await self._forward("ScaleDeployment", request, context)) is not None:
            return forwarded  # type: ignore[no-any-return]
        updated = node_pb2.Deployment()
        updated.CopyFrom(deployment)
        updated.replicas = request.replicas
        async with self._leading():
            await self._reconciler.save_deployment(updated)
            await self._reconciler.reconcile()
        return self._shown(admin_pb2.ScaleDeploymentResponse(deployment=updated))

    async def ExplainPlacement(
        self, request: admin_pb2.ExplainPlacementRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ExplainPlacementResponse:
        if request.name:
            spec = self._deployment(request.name).spec
        else:
            spec = validate_deployment(request.deployment).spec
        verdicts = placement.evaluate(spec, self._reconciler.snapshots(), self._reconciler.policy)
        return self._shown(
            admin_pb2.ExplainPlacementResponse(
                verdicts=[
                    admin_pb2.NodeVerdict(
                        node_id=v.node_id,
                        fits=v.fit is not None,
                        reason=v.reason,
                        score=v.score,
                        device=v.fit.device if v.fit else "",
                    )
                    for v in verdicts
                ],
                chosen_node_id=verdicts[0].node_id if verdicts and verdicts[0].fit else "",
            )
        )

    # --- API keys -------------------------------------------------------------------------------------

    def _api_keys(self) -> ApiKeys:
        if self._keys is None:
            raise FleetError(ErrorCode.NOT_CONFIGURED, "API keys need the control plane's etcd store")
        return self._keys

    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateApiKeyResponse:
        keys = self._api_keys()
        if (forwarded := await self._forward("CreateApiKey", request, context)) is not None:
            return forwarded  # type: ignore[no-any-return]
        async with self._leading():
            key, secret = await keys.create(request, self._reconciler.fence())
        return admin_pb2.CreateApiKeyResponse(key=key, secret=secret)

    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListApiKeysResponse:
        keys = self._api_keys()
        await keys.load()  # the authoritative answer, as ListNodes gives
        return keys.listed()

    async def RevokeApiKey(
        self, request: admin_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeApiKeyResponse:
        keys = self._api_keys()
        required(request.id, "id")  # checked before forwarding: refused whoever leads
        if (forwarded := await self._forward("RevokeApiKey", request, context)) is not None:
            return forwarded  # type: ignore[no-any-return]
        async with self._leading():
            key = await keys.revoke(request.id, self._reconciler.fence())
        return admin_pb2.RevokeApiKeyResponse(key=key)

    async def WatchApiKeys(
        self, request: admin_pb2.WatchApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.WatchApiKeysResponse]:
        async for snapshot in until_set(self._closing, self._api_keys().snapshots()):
            yield snapshot

    async def AcquireQuota(
        self, request: admin_pb2.AcquireQuotaRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AcquireQuotaResponse:
        keys = self._api_keys()
        required(request.key_id, "key_id")
        # Forwarded first: the windows are the leader's, and a follower may not have read a new key yet.
        if (forwarded := await self._forward("AcquireQuota", request, context)) is not None:
            return forwarded  # type: ignore[no-any-return]
        record = keys.records.get(request.key_id)
        if record is None:
            await keys.load()  # made a moment ago by another leader, or not read yet
            record = keys.records.get(request.key_id)
        if record is None:
            raise FleetError(ErrorCode.API_KEY_NOT_FOUND, f"no API key has id '{request.key_id}'", param="key_id")
        limits = record.key.limits
        grant = self._quotas.acquire(
            request.key_id,
            request.edge_id,
            min(request.requests, 1024),
            request.tokens_used,
            request.in_flight,
            request.requests_returned,
            limits.requests_per_minute,
            limits.tokens_per_minute,
        )
        return admin_pb2.AcquireQuotaResponse(
            requests_granted=grant.requests_granted,
            requests_remaining=grant.requests_remaining,
            tokens_remaining=grant.tokens_remaining,
            reset_seconds=grant.reset_seconds,
            others_in_flight=grant.others_in_flight,
            edges=grant.edges,
        )


def _no_leader(why: str) -> FleetError:
    return FleetError(
        ErrorCode.BACKEND_UNAVAILABLE, f"{why}; nothing was written, retry shortly", retry_after_seconds=1
    )
