"""Run the control plane: etcd store, fleet view, leader election, reconciler, router, and the registry,
routing and admin gRPC services.

Several control planes may run against one etcd: every one follows etcd and serves every RPC; the one that
wins the election (controlplane/leader.py) also reconciles and makes the writes, the others forward writes
to it."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

from controlplane import metrics
from controlplane.admin import Admin, reapplied, validate_deployment
from controlplane.api_keys import AuthSettings
from controlplane.etcd_store import EtcdStore
from controlplane.fleet import FleetView
from controlplane.join import JoinService, JoinTokenAdmin, JoinTokens, NodeIdentities
from controlplane.leader import Leadership
from controlplane.placement import GiB, PlacementPolicy
from controlplane.reconciler import Reconciler
from controlplane.registry import NodeRegistry
from controlplane.route_publisher import RoutePublisher
from controlplane.router import Router
from controlplane.routing_service import RoutingService
from controlplane.settings import ControlPlaneSettings
from controlplane.store import FencedOut
from fleetlm.controlplane.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    node_pb2,
    registry_pb2,
    registry_pb2_grpc,
    routing_pb2,
    routing_pb2_grpc,
)
from mesh import logs, tracing
from mesh import metrics as metrics_port
from mesh.auth import CallerKinds, read_admin_token, read_secret_file
from mesh.catalog import CatalogError, load_catalog
from mesh.errors import FleetError
from mesh.fleet_ca import FleetCA
from mesh.grpc_server import GrpcServer
from mesh.lifecycle import bound_address, run_until_signalled
from mesh.tls import TlsFiles, keep_ssl_context_current, refuse_exposed_plaintext, server_credentials

log = logging.getLogger(__name__)

ROUTING_SERVICE = routing_pb2.DESCRIPTOR.services_by_name["RoutingService"].full_name
SERVICE_NAMES = [
    registry_pb2.DESCRIPTOR.services_by_name["NodeRegistryService"].full_name,
    ROUTING_SERVICE,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
]
JOIN_SERVICE = identity_pb2.DESCRIPTOR.services_by_name["JoinService"].full_name


class FleetAdmin(JoinTokenAdmin, Admin):
    """AdminService: the control plane's Admin with the join-token RPCs."""


def _as_entry(deployment: node_pb2.Deployment) -> node_pb2.Deployment:
    """What a deployments file's entry says of a deployment: not its replicas now, nor when it was written."""
    out = node_pb2.Deployment()
    out.CopyFrom(deployment)
    out.ClearField("replicas")
    out.ClearField("created_at")
    return out


async def _load_deployments(path: str, fleet: FleetView, reconciler: Reconciler) -> None:
    """The file's deployments, where they are newer than what etcd holds. A deployment an operator changed
    (DeployModel) after the file was last written keeps the operator's spec: the file is applied by whichever
    control plane leads first, and a control plane that comes to lead later, with the same old file, must not
    undo a change made since (it did, and moved every replica for it). A file edited since is applied.
    A deployment an operator removed (UndeployModel) stays removed until the file's entry for it changes (a
    restart with the same file re-created it)."""
    written_at = await asyncio.to_thread(os.path.getmtime, path)
    for entry in load_catalog(Path(path)):
        deployment = validate_deployment(entry.deployment())
        existing = fleet.deployments.get(entry.name)
        removed = fleet.records["undeployed"].get(entry.name)
        if existing is None and removed is not None:
            unchanged = _as_entry(removed.deployment) == _as_entry(deployment)
            if unchanged or removed.undeployed_at.ToNanoseconds() / 1e9 > written_at:
                log.info(
                    "deployment %s was undeployed (UndeployModel) at %s, and %s has not changed it since: kept"
                    " undeployed (change its entry, or use DeployModel, to deploy it again)",
                    entry.name,
                    removed.undeployed_at.ToJsonString(),
                    path,
                )
                continue
        if existing is not None and existing.spec == deployment.spec:
            continue  # keep the replica count it has now
        if existing is not None and existing.created_at.ToNanoseconds() / 1e9 > written_at:
            # created_at is when the deployment was last written by DeployModel or a file (a scale keeps it).
            log.warning(
                "deployment %s differs from %s, which is older than its last change: keeping the deployment as"
                " it is (edit the file, or use DeployModel, to change it)",
                entry.name,
                path,
            )
            continue
        await reconciler.save_deployment(reapplied(deployment, existing))
        log.info("deployment %s loaded from %s", entry.name, path)


def _registered(fleet: FleetView, node_id: str) -> str | None:
    """The address of the node registered as `node_id` now (node records live under their leases)."""
    node = fleet.nodes.get(node_id)
    return (node.inference_address or "an unknown address") if node is not None else None


def _advertised(settings: ControlPlaneSettings, port: int) -> str:
    if settings.advertise:
        return settings.advertise
    host = settings.listen.rsplit(":", 1)[0]
    if host in ("0.0.0.0", "[::]", ""):
        host = socket.getfqdn()
    return f"{host}:{port}"


async def _load_deployments_when_leading(
    path: str, leadership: Leadership, fleet: FleetView, reconciler: Reconciler
) -> None:
    """The deployments file is applied by the leader (only it writes), once, when this control plane first
    leads; every control plane may be given the same file."""
    while True:
        await leadership.elected.wait()
        try:
            await _load_deployments(path, fleet, reconciler)
            return
        except FencedOut:
            continue  # lost the leadership meanwhile: whoever leads now applies its own file


async def serve(settings: ControlPlaneSettings, stop: asyncio.Event) -> None:
    store = EtcdStore(settings.etcd, settings.etcd_prefix, access=settings.etcd_access())
    await store.connect_for("controlplane")
    fleet = FleetView(store, settings.resync_interval_seconds)
    policy = PlacementPolicy(
        strategy=settings.placement_strategy,
        ram_reserve_bytes=int(settings.ram_reserve_gib * GiB),
        vram_reserve_bytes=int(settings.vram_reserve_gib * GiB),
    )
    leadership = Leadership(store, "", settings.leader_ttl_seconds)  # its address is known once bound
    reconciler = Reconciler(store, fleet, policy, settings.reconcile_interval_seconds, leadership)
    tls = TlsFiles.of(settings.tls_cert, settings.tls_key, settings.tls_ca)
    admin = FleetAdmin(store, fleet, reconciler, tls=tls)  # forwards writes to the leader over mutual TLS
    router = Router(fleet, reconciler, scale_from_zero=admin.ensure_replica)
    publisher = RoutePublisher(fleet)
    ca = FleetCA.load(settings.ca_dir) if settings.ca_dir else None
    identities = NodeIdentities(store)
    lifetime_days = settings.node_cert_lifetime_seconds / 86400
    join = (
        JoinService(JoinTokens(store), ca, identities, lifetime_days, lambda node_id: _registered(fleet, node_id))
        if ca is not None
        else None
    )
    if ca is not None:
        admin.join_tokens, admin.ca_fingerprint = JoinTokens(store), ca.fingerprint
    # With TLS the routing table (every node's address) goes to edges, operators and control planes, not to
    # a node's certificate (mesh.auth.CallerKinds).
    callers = CallerKinds("control plane", {ROUTING_SERVICE: ("edge", "admin", "controlplane")}) if tls else None
    server = GrpcServer(SERVICE_NAMES + ([JOIN_SERVICE] if join else []), check_caller=callers)
    registry = NodeRegistry(store, fleet, settings.lease_ttl_seconds, tls is not None, identities)
    registry_pb2_grpc.add_NodeRegistryServiceServicer_to_server(registry, server.server)
    join_server = None
    if join is not None:
        identity_pb2_grpc.add_JoinServiceServicer_to_server(join, server.server)  # Renew, over mutual TLS
        if tls is not None and settings.join_listen:
            # Join alone on its own port: without a client certificate, nothing else may be reached.
            join_server = GrpcServer([JOIN_SERVICE])
            identity_pb2_grpc.add_JoinServiceServicer_to_server(join, join_server.server)
    routing_pb2_grpc.add_RoutingServiceServicer_to_server(RoutingService(router, publisher), server.server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server.server)
    # Beyond loopback the metrics port speaks HTTPS with the control plane's certificate.
    scraped = metrics_port.start("controlplane", settings.metrics_listen, tls, metrics.registry(fleet, leadership))
    try:
        async with asyncio.TaskGroup() as tasks:
            follower = tasks.create_task(fleet.run())
            async with asyncio.timeout(30):  # not wait_for, which can swallow a cancellation on 3.11
                await fleet.synced.wait()
            grace = settings.startup_grace_seconds
            settling = tasks.create_task(fleet.settle(settings.lease_ttl_seconds + 5 if grace is None else grace))
            reconciling = tasks.create_task(reconciler.run())
            publishing = tasks.create_task(publisher.run())
            port = await server.start(settings.listen, server_credentials(tls, True) if tls else None)
            if join_server is not None and tls is not None and settings.join_listen:
                join_port = await join_server.start(settings.join_listen, server_credentials(tls, False))
                where = bound_address(settings.join_listen, join_port)
                log.info("JoinService on %s (TLS, CA %s)", where, ca and ca.fingerprint)
            leadership.address = _advertised(settings, port)
            electing = tasks.create_task(leadership.run())
            # The metrics port's HTTPS takes renewed certificate files too, as the gRPC server does.
            context = scraped.ssl_context if scraped is not None and tls is not None else None
            rotating = tasks.create_task(keep_ssl_context_current(context, tls)) if context and tls else None
            loading = None
            if settings.deployments:
                loading = tasks.create_task(
                    _load_deployments_when_leading(settings.deployments, leadership, fleet, reconciler)
                )
            log.info(
                "control plane listening on %s, advertised as %s (etcd %s)",
                bound_address(settings.listen, port),
                leadership.address,
                settings.etcd,
            )
            await stop.wait()
            # Order: stop deciding and give up the leadership at once (revoking its lease, so that another
            # control plane leads now, not after this one's grace: writes sent here meanwhile are forwarded
            # to it), then stop taking RPCs and drain them, then stop following etcd.
            # Streams never end by themselves: ended now, so that edges and nodes move on (or come back) at
            # once and the server's stop does not wait out its grace for them.
            publisher.close()
            registry.close()
            admin.end_streams()
            if join_server is not None:
                await join_server.stop(0)
            for task in (loading, settling, reconciling):
                if task is not None:
                    task.cancel()
            leadership.stopping = True
            electing.cancel()
            await asyncio.gather(electing, return_exceptions=True)  # its last step revokes the lease
            await server.stop(settings.shutdown_grace_seconds)
            if rotating is not None:
                rotating.cancel()
            publishing.cancel()
            follower.cancel()
    finally:
        # Stopped already, unless a later step failed (the join port's bind, say): then the server that did
        # start is stopped here, while its event loop runs.
        for started in (server, join_server):
            if started is not None:
                await started.stop(0)
        if scraped is not None:
            scraped.close()
        await admin.close()
        await store.close()
    log.info("control plane stopped")


def _check_tls(settings: ControlPlaneSettings) -> None:
    tls = TlsFiles.of(settings.tls_cert, settings.tls_key, settings.tls_ca)
    if tls is not None:
        tls.read()  # PEM files, and a key that is the certificate's
    metrics_port.check_listen(settings.metrics_listen)
    exposed = [settings.listen, *([settings.metrics_listen] if settings.metrics_listen else [])]
    refuse_exposed_plaintext("the control plane", exposed, tls is not None, settings.insecure_plaintext)
    if settings.join_listen and (tls is None or settings.ca_dir is None):
        raise ValueError("--join-listen needs --tls-cert, --tls-key, --tls-ca and --ca-dir")
    if settings.ca_dir is not None:
        FleetCA.load(settings.ca_dir)
    EtcdStore(settings.etcd, settings.etcd_prefix, access=settings.etcd_access())  # bad etcd options fail here


def _check_credentials() -> None:
    """The fleet secret and the admin token files, where AdminService reads them (FLEETLM_CP_*, set by the
    flags): readable and long enough, before anything starts. Their content is never shown."""
    auth = AuthSettings(**{})  # from the environment alone
    if auth.auth_secret_file is not None:
        read_secret_file(auth.auth_secret_file, "auth secret")
    if auth.admin_token_file is not None:
        read_admin_token(auth.admin_token_file)


def main(settings: ControlPlaneSettings) -> None:
    logs.setup("controlplane", settings.log_level, settings.log_format)
    try:
        _check_tls(settings)
        _check_credentials()
        traces = tracing.setup("controlplane")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"fleetlm controlplane: {exc}") from None
    if settings.deployments:
        try:
            for entry in load_catalog(Path(settings.deployments)):
                validate_deployment(entry.deployment())
        except (CatalogError, FleetError) as exc:
            raise SystemExit(f"fleetlm controlplane: {exc}") from None
    try:
        run_until_signalled(lambda stop: serve(settings, stop), settings.shutdown_grace_seconds)
    finally:
        if traces is not None:
            traces.shutdown()
