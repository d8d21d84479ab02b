"""`fleetlm` command line. Flags override the FLEETLM_* environment variables of each component."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

if TYPE_CHECKING:
    from controlplane.etcd_store import EtcdStore


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _settings(cls: type, values: dict[str, Any]) -> Any:
    try:
        return cls(**values)
    except ValidationError as exc:
        raise SystemExit(f"fleetlm: invalid settings:\n{exc}") from None


def _port(text: str) -> int:
    """argparse type: a TCP port."""
    port = _whole(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1-65535)")
    return port


def _origins(text: str) -> str:
    """argparse type: --cors-origins, checked as the edge's settings check it."""
    from edge.settings import cors_origins

    try:
        cors_origins(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _count(text: str) -> int:
    """argparse type: a limit of a key, 0 (none) up to what the API's uint32 holds."""
    count = _whole(text)
    if not 0 <= count <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{text} must be from 0 (no limit) to {0xFFFFFFFF}")
    return count


def _seconds(text: str) -> float:
    """argparse type: a duration in seconds, not negative."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a number of seconds, 0 or more")
    return seconds


def _period(text: str) -> float:
    """argparse type: a period in seconds, more than 0."""
    seconds = _seconds(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a number of seconds more than 0")
    return seconds


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _controlplane(args: argparse.Namespace) -> None:
    from controlplane.server import main
    from controlplane.settings import ControlPlaneSettings

    values = _given(
        args,
        "listen",
        "advertise",
        "etcd",
        "etcd_prefix",
        "deployments",
        "placement_strategy",
        "log_level",
        "log_format",
        *TLS_FLAGS,
        *ETCD_FLAGS,
        "ca_dir",
        "join_listen",
        "metrics_listen",
    )
    if args.leader_ttl is not None:
        values["leader_ttl_seconds"] = args.leader_ttl
    if args.lease_ttl is not None:
        values["lease_ttl_seconds"] = args.lease_ttl
    if args.startup_grace is not None:
        values["startup_grace_seconds"] = args.startup_grace
    if args.node_cert_lifetime is not None:
        values["node_cert_lifetime_seconds"] = args.node_cert_lifetime
    # The credentials are read by controlplane.api_keys.AuthSettings from FLEETLM_CP_*: the flags set those.
    _flags_to_env(args, "FLEETLM_CP_", "auth_secret_file", "admin_token_file")
    main(_settings(ControlPlaneSettings, values))


def _node(args: argparse.Namespace) -> None:
    from node_agent.server import main
    from node_agent.settings import NodeSettings

    values = _given(
        args,
        "node_id",
        "listen",
        "advertise",
        "controlplane",
        "catalog",
        "threads",
        "engine_idle",
        "engine_nice",
        "sglang_python",
        "engine_health_seconds",
        "inventory_override",
        "log_level",
        "log_format",
        *TLS_FLAGS,
        "join_token",
        "ca_fingerprint",
        "join_address",
        "state_dir",
        "metrics_listen",
    )
    if args.unified_kv:
        values["unified_kv"] = True
    if args.models_dir:
        values["models_dirs"] = args.models_dir
    main(_settings(NodeSettings, values))


def _edge(args: argparse.Namespace) -> None:
    from edge.server import EdgeTlsSettings, main
    from edge.settings import EdgeSettings

    values = _given(args, "http_listen", "grpc_listen", "controlplane", "log_level", "log_format", "cors_origins")
    if args.request_timeout is not None:
        values["request_timeout_seconds"] = args.request_timeout
    if args.scale_from_zero_timeout is not None:
        values["scale_from_zero_timeout_seconds"] = args.scale_from_zero_timeout
    if args.breaker_cooldown is not None:
        values["breaker_cooldown_seconds"] = args.breaker_cooldown
    if args.failover_seconds is not None:
        values["failover_seconds"] = args.failover_seconds
    if args.no_metrics:
        values["metrics"] = False
    if args.no_node_streams:
        values["node_streams"] = False
    http_limits = {
        "max_body_bytes": "max_body_bytes",
        "body_timeout": "body_timeout_seconds",
        "header_timeout": "header_timeout_seconds",
        "keep_alive": "keep_alive_seconds",
    }
    for flag, field in http_limits.items():
        if getattr(args, flag) is not None:
            values[field] = getattr(args, flag)
    # The edge's auth is built from FLEETLM_EDGE_* (edge.auth): the flags set those.
    if args.require_api_key:
        os.environ["FLEETLM_EDGE_REQUIRE_API_KEY"] = "true"
    _flags_to_env(args, "FLEETLM_EDGE_", "auth_secret_file")
    main(_settings(EdgeSettings, values), _settings(EdgeTlsSettings, _given(args, *TLS_FLAGS)))


def _flags_to_env(args: argparse.Namespace, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            os.environ[prefix + name.upper()] = str(value)


TLS_FLAGS = ("tls_cert", "tls_key", "tls_ca", "insecure_plaintext")
ETCD_FLAGS = ("etcd_ca", "etcd_cert", "etcd_key", "etcd_user", "etcd_password_file")


def _log_format_flag(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--log-format", choices=["text", "json"], help="log lines as text (default) or one JSON object per line"
    )


def _etcd_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument("--etcd-ca", help="CA (PEM) of etcd's certificate: TLS to etcd (https:// URL)")
    command.add_argument("--etcd-cert", help="client certificate (PEM) for etcd's --client-cert-auth")
    command.add_argument("--etcd-key", help="private key (PEM) of --etcd-cert")
    command.add_argument("--etcd-user", help="etcd user; its password from FLEETLM_CP_ETCD_PASSWORD or a file")
    command.add_argument("--etcd-password-file", help="file holding the password of --etcd-user")


def _tls_flags(command: argparse.ArgumentParser, role: str) -> None:
    command.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=None,
        help="serve plaintext on a non-loopback address (refused without this flag unless TLS is on)",
    )
    command.add_argument("--tls-cert", help=f"{role}'s certificate (PEM); with --tls-key and --tls-ca: TLS on")
    command.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
    command.add_argument("--tls-ca", help="the fleet CA (PEM) that peers' certificates are verified with")


def _ca(args: argparse.Namespace) -> None:
    from pathlib import Path

    from mesh.fleet_ca import CA_CERT, FleetCA, check_identity_name, identity_uri, write_private, write_public

    directory = Path(args.dir).expanduser()
    if args.action in ("revoke", "readmit"):
        _revoke_node(args)
        return
    try:
        if args.action == "init":
            ca = FleetCA.create(directory)
            print(f"fleet CA created in {directory}\nfingerprint: {ca.fingerprint}")
            return
        if not (directory / CA_CERT).exists():
            raise ValueError(f"no fleet CA in {directory}; make one with: fleetlm ca init --dir {directory}")
        ca = FleetCA.load(directory)
        if args.action == "fingerprint":
            print(ca.fingerprint)
            return
        if not args.identity or not args.out:
            raise ValueError("issue needs --identity and --out")
        kind, _, name = args.identity.partition("/")
        if name:
            check_identity_name(kind, name)
        cert, key = ca.issue(identity_uri(kind, name), args.dns, args.ip, args.days)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"fleetlm ca {args.action}: {exc}") from None
    write_private(Path(f"{args.out}.key"), key)
    write_public(Path(f"{args.out}.crt"), cert)
    print(f"{args.out}.crt and {args.out}.key (0600) for {identity_uri(kind, name)}")


def _revoke_node(args: argparse.Namespace) -> None:
    import asyncio

    from controlplane.join import NodeIdentities

    if not args.node:
        raise SystemExit(f"fleetlm ca {args.action}: --node ID is required")

    async def run() -> bool:
        async with _etcd(args, f"ca {args.action}") as store:
            identities = NodeIdentities(store)
            return await (identities.revoke if args.action == "revoke" else identities.readmit)(args.node)

    try:
        known = asyncio.run(run())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"fleetlm ca {args.action}: {exc}") from None
    if args.action == "readmit":
        if not known:
            raise SystemExit(f"fleetlm ca readmit: node {args.node} is not revoked")
        print(f"node {args.node} may join again with a join token (none of its old certificates is accepted)")
        return
    print(f"node {args.node} revoked" + ("" if known else " (it had not joined with a token yet)"))


@contextlib.asynccontextmanager
async def _etcd(args: argparse.Namespace, command: str) -> AsyncIterator[EtcdStore]:
    """The etcd of --etcd and the etcd flags, connected, for one command. An etcd it cannot use (down, a name
    that does not resolve, refused credentials, one that stops answering) ends the command with one line
    naming it, as the control plane's start-up does."""
    from controlplane.etcd_store import EtcdStore
    from controlplane.settings import ControlPlaneSettings
    from controlplane.store import StoreUnavailable

    etcd = _settings(ControlPlaneSettings, {"etcd": args.etcd, **_given(args, *ETCD_FLAGS)})
    store = EtcdStore(etcd.etcd, args.etcd_prefix, access=etcd.etcd_access())
    try:
        await store.connect_for(command)
        yield store
    except StoreUnavailable as exc:  # went away since
        raise SystemExit(f"fleetlm {command}: cannot use etcd: {exc.message}") from None
    finally:
        await store.close()


def _keys(args: argparse.Namespace) -> None:
    """fleetlm keys create|list|revoke (AdminService, with the admin token) and new-secret (a secret file)."""
    from pathlib import Path

    from mesh.auth import create_secret_file

    if args.action == "new-secret":
        if not args.name:
            raise SystemExit("fleetlm keys new-secret FILE: name the file to create")
        try:
            create_secret_file(Path(args.name).expanduser())
        except OSError as exc:
            raise SystemExit(f"fleetlm keys new-secret: {exc}") from None
        print(f"{args.name} (0600): 32 random bytes, for --auth-secret-file or --admin-token-file")
        return
    import asyncio
    import json
    import time
    from dataclasses import replace

    import grpc
    from google.protobuf import json_format

    from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc
    from launcher import admin_access

    if args.action == "create" and not args.name:
        raise SystemExit("fleetlm keys create NAME: the key needs a name")
    if args.action == "revoke" and not args.name:
        raise SystemExit("fleetlm keys revoke ID: name the key's id")

    async def run_at(target: admin_access.Target) -> None:
        metadata = admin_access.metadata(target)
        call = {"metadata": metadata, "timeout": 30}
        async with admin_access.channel(target) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            if args.action == "create":
                request = admin_pb2.CreateApiKeyRequest(name=args.name, models=args.model)
                request.limits.requests_per_minute = args.rpm
                request.limits.tokens_per_minute = args.tpm
                request.limits.max_concurrent_requests = args.concurrency
                if args.expires_in:
                    request.expires_at.FromSeconds(int(time.time() + args.expires_in))
                created = await stub.CreateApiKey(request, **call)
                print(f"id: {created.key.id}")
                print(f"secret (shown once; keep it now): {created.secret}")
            elif args.action == "list":
                listed = await stub.ListApiKeys(admin_pb2.ListApiKeysRequest(), **call)
                for key in listed.keys:
                    print(json.dumps(json_format.MessageToDict(key)))
            else:
                revoked = await stub.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(id=args.name), **call)
                print(f"revoked {revoked.key.id} ({revoked.key.name})")

    async def run(target: admin_access.Target) -> None:
        # Any control plane serves these (a follower forwards writes to the leader): the first that answers.
        # One that cannot be reached has had nothing written through it, so the next is asked.
        *others, last = target.addresses
        for address in [*others, last]:
            at = replace(target, address=address)
            try:
                return await run_at(at)
            except grpc.aio.AioRpcError as exc:
                if address == last or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise admin_access.AccessError(admin_access.explain(at, exc)) from None

    try:
        asyncio.run(run(admin_access.find_target(args)))
    except admin_access.AccessError as exc:
        raise SystemExit(f"fleetlm keys {args.action}: {exc}") from None


def _join_token(args: argparse.Namespace) -> None:
    import asyncio
    import time
    from pathlib import Path

    from controlplane.join import JoinTokens, utc
    from mesh.fleet_ca import FleetCA

    try:
        fingerprint = FleetCA.load(Path(args.ca_dir).expanduser()).fingerprint if args.action == "create" else ""
    except (OSError, ValueError) as exc:
        raise SystemExit(f"fleetlm join-token: no fleet CA in {args.ca_dir}: {exc}") from None

    async def run() -> None:
        async with _etcd(args, f"join-token {args.action}") as store:
            tokens = JoinTokens(store)
            if args.action == "create":
                token, record = await tokens.create(args.ttl, args.description)
                print(f"join token (shown once): {token}\nexpires: {utc(record.expires_at)}")
                # As README's "A fleet of machines" starts a node: the token in the environment, not in `ps`.
                print(
                    f"FLEETLM_NODE_JOIN_TOKEN={token} fleetlm node --controlplane CP:PORT"
                    f" --join-address CP:JOINPORT --ca-fingerprint {fingerprint}"
                )
            elif args.action == "list":
                now = time.time()
                for t in await tokens.list():
                    print(f"{t.id}\t{t.state(now)}\texpires {utc(t.expires_at)}\t{t.description}")
            else:
                token_id = (args.token_id or "").removeprefix("fljt_").split(".")[0]
                if not token_id or not await tokens.revoke(token_id):
                    raise SystemExit(f"fleetlm join-token revoke: no token {token_id!r}")
                print(f"join token {token_id} revoked")

    try:
        asyncio.run(run())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"fleetlm join-token {args.action}: {exc}") from None


def _up(args: argparse.Namespace) -> None:
    from launcher.up import run

    if args.log_format is not None:  # the components it starts read it from their environment
        for prefix in ("FLEETLM_CP_", "FLEETLM_NODE_", "FLEETLM_EDGE_"):
            os.environ[prefix + "LOG_FORMAT"] = args.log_format
    sys.exit(run(args))


def _status(args: argparse.Namespace) -> None:
    from launcher.status import run

    sys.exit(run(args))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fleetlm", description="LLM serving across a fleet of machines.")
    sub = top.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run etcd, control plane, one node agent and the edge on this machine")
    up.add_argument("--host", default="127.0.0.1", help="address every component binds (default 127.0.0.1)")
    up.add_argument("--http-port", type=_port, default=8080, help="edge OpenAI HTTP port (8080)")
    up.add_argument("--grpc-port", type=_port, default=50050, help="edge gRPC port (50050)")
    up.add_argument("--controlplane-port", type=_port, default=50051, help="control plane port (50051)")
    up.add_argument("--node-port", type=_port, default=50061, help="node agent port (50061)")
    up.add_argument("--etcd-port", type=_port, default=2379, help="embedded etcd client port; peer is +1 (2379)")
    up.add_argument(
        "--controlplane-metrics-port", type=_port, default=9400, help="control plane Prometheus /metrics port (9400)"
    )
    up.add_argument("--node-metrics-port", type=_port, default=9401, help="node agent Prometheus /metrics port (9401)")
    up.add_argument("--etcd", help="URL of an existing etcd to use instead of the embedded one")
    up.add_argument(
        "--catalog", help="deployments to run, models.yaml (default: SmolLM2-135M-Instruct as smollm2-135m)"
    )
    up.add_argument("--threads", type=int, help="CPU threads for llama.cpp (default: all cores)")
    up.add_argument("--lease-ttl", type=int, default=10, help="node lease TTL in seconds (10)")
    up.add_argument(
        "--cors-origins",
        type=_origins,
        help="web origins whose pages may call the edge's HTTP API (CORS), comma-separated, or * for any (none)",
    )
    up.add_argument(
        "--require-auth",
        action="store_true",
        help="API keys on the edge and the admin token on AdminService, made in the state directory"
        " (always on when --host is not loopback)",
    )
    up.add_argument(
        "--tls",
        action="store_true",
        help="TLS on every link with a fleet CA made in the state directory (always on when --host is not loopback)",
    )
    default_state = os.path.join(os.environ.get("XDG_STATE_HOME", "~/.local/state"), "fleetlm")
    up.add_argument("--state-dir", default=default_state, help=f"etcd data and logs ({default_state})")
    _log_format_flag(up)
    up.set_defaults(run=_up)

    cp = sub.add_parser("controlplane", help="run the control plane")
    cp.add_argument("--listen", help="host:port to bind (127.0.0.1:50051)")
    cp.add_argument("--advertise", help="host:port other control planes forward writes to (default: from --listen)")
    cp.add_argument(
        "--leader-ttl",
        type=int,
        help="seconds before another control plane leads when the leader dies (3); several may share one etcd",
    )
    cp.add_argument("--etcd", help="etcd URL (http://127.0.0.1:2379)")
    cp.add_argument("--etcd-prefix", help="etcd key prefix (/fleetlm)")
    cp.add_argument("--lease-ttl", type=int, help="node lease TTL in seconds (10)")
    cp.add_argument(
        "--startup-grace",
        type=float,
        help="seconds to wait at start-up for nodes with assignments to register again (lease TTL + 5)",
    )
    cp.add_argument("--deployments", help="models.yaml of deployments to create at start-up")
    cp.add_argument("--placement-strategy", choices=["spread", "binpack"], help="replica placement (spread)")
    cp.add_argument("--log-level")
    _log_format_flag(cp)
    cp.add_argument(
        "--auth-secret-file",
        help="the fleet secret (>= 32 bytes; fleetlm keys new-secret): API keys are kept as its HMACs",
    )
    cp.add_argument("--admin-token-file", help="the operators' token: every AdminService RPC then needs it")
    _tls_flags(cp, "the control plane")
    cp.add_argument("--ca-dir", help="directory of the fleet CA (ca.crt, ca.key); Join signs with it")
    cp.add_argument("--join-listen", help="host:port of JoinService, TLS without client certificates")
    cp.add_argument("--metrics-listen", help="host:port of the Prometheus metrics port (127.0.0.1:9400; '' for none)")
    cp.add_argument(
        "--node-cert-lifetime",
        type=float,
        help="seconds the node certificates it signs are valid (30 days); nodes renew at two thirds of it",
    )
    _etcd_flags(cp)
    cp.set_defaults(run=_controlplane)

    node = sub.add_parser("node", help="run a node agent")
    node.add_argument("--catalog", help="models.yaml of models this node always serves")
    node.add_argument("--node-id", help="node id (default: host name)")
    node.add_argument("--listen", help="host:port of its InferenceService (127.0.0.1:50061)")
    node.add_argument("--advertise", help="host:port the edge should dial (default: from --listen)")
    node.add_argument(
        "--controlplane", help="control plane host:port, or several separated by commas (127.0.0.1:50051)"
    )
    node.add_argument(
        "--models-dir",
        action="append",
        help="directory with model files the control plane may assign (repeatable)",
    )
    node.add_argument("--inventory-override", help="YAML replacing parts of the measured inventory")
    node.add_argument(
        "--unified-kv", action="store_true", help="share prefixes across slots; batched output may differ from alone"
    )
    node.add_argument("--threads", type=int, help="CPU threads per llama.cpp context (all cores)")
    node.add_argument(
        "--engine-idle",
        action=argparse.BooleanOptionalAction,
        help="llama.cpp's compute threads in the SCHED_IDLE class: any other thread takes a core at once (on)",
    )
    node.add_argument("--engine-nice", type=int, help="with --no-engine-idle, nice of llama.cpp's threads, 0-19 (10)")
    node.add_argument("--sglang-python", help="Python that runs sglang.launch_server (the agent's own)")
    node.add_argument("--engine-health-seconds", type=float, help="health-check period of engine servers (5)")
    node.add_argument("--log-level")
    _log_format_flag(node)
    _tls_flags(node, "this node")
    node.add_argument("--join-token", help="join token (FLEETLM_NODE_JOIN_TOKEN keeps it out of ps)")
    node.add_argument("--ca-fingerprint", help="sha256:... of the fleet CA, pinned for --join-token")
    node.add_argument("--join-address", help="host:port of the control plane's --join-listen")
    node.add_argument("--state-dir", help="where the node keeps its key and certificate")
    node.add_argument("--metrics-listen", help="host:port of the Prometheus metrics port (127.0.0.1:9401; '' for none)")
    node.set_defaults(run=_node)

    edge = sub.add_parser("edge", help="run the edge (OpenAI HTTP + gRPC front door)")
    edge.add_argument("--http-listen", help="host:port of the HTTP API (127.0.0.1:8080)")
    edge.add_argument("--grpc-listen", help="host:port of the gRPC API (127.0.0.1:50050)")
    edge.add_argument(
        "--controlplane", help="control plane host:port, or several separated by commas (127.0.0.1:50051)"
    )
    edge.add_argument("--request-timeout", type=float, help="request timeout in seconds (600)")
    edge.add_argument(
        "--scale-from-zero-timeout", type=float, help="wait for a model to load on first request, seconds (120)"
    )
    edge.add_argument(
        "--failover-seconds",
        type=float,
        help="how long a request that every replica refused while going away is routed again (3)",
    )
    edge.add_argument(
        "--breaker-cooldown",
        type=float,
        help="seconds an unreachable node is skipped before a request probes it again, doubling to 30 (1)",
    )
    edge.add_argument("--log-level")
    _log_format_flag(edge)
    edge.add_argument("--require-api-key", action="store_true", help="every /v1 and gRPC request needs an API key")
    edge.add_argument("--max-body-bytes", type=int, help="largest HTTP request body; above it 413 (8 MiB)")
    edge.add_argument("--body-timeout", type=float, help="seconds a request body has to arrive; then 408 (30)")
    edge.add_argument("--header-timeout", type=float, help="seconds request headers have to arrive; then 408 (10)")
    edge.add_argument("--keep-alive", type=int, help="seconds an idle HTTP connection is kept (5)")
    edge.add_argument(
        "--cors-origins",
        type=_origins,
        help="web origins whose pages may call the HTTP API (CORS), comma-separated, or * for any (none)",
    )
    edge.add_argument("--auth-secret-file", help="the fleet secret the control plane was given")
    edge.add_argument(
        "--no-metrics", action="store_true", help="no Prometheus /metrics on the HTTP port, and no counting for it"
    )
    edge.add_argument(
        "--no-node-streams",
        action="store_true",
        help="a gRPC call to the node per Generate request, not one stream per node carrying them all",
    )
    _tls_flags(edge, "the edge")
    edge.set_defaults(run=_edge)

    keys = sub.add_parser("keys", help="create, list or revoke API keys (AdminService, with the admin token)")
    keys.add_argument("action", choices=["create", "list", "revoke", "new-secret"])
    keys.add_argument("name", nargs="?", help="create: the key's name; revoke: its id; new-secret: the file")
    keys.add_argument(
        "--controlplane",
        help="control plane host:port, or several comma-separated (default: the one fleetlm up runs, else"
        " 127.0.0.1:50051)",
    )
    keys.add_argument(
        "--admin-token-file", help="file holding the admin token (or FLEETLM_ADMIN_TOKEN; default: fleetlm up's)"
    )
    keys.add_argument(
        "--state-dir", default=default_state, help=f"where fleetlm up left operator.json ({default_state})"
    )
    keys.add_argument("--model", action="append", default=[], help="create: a model it may use (repeatable; all)")
    keys.add_argument("--rpm", type=_count, default=0, help="create: requests per minute, fleet-wide (0: no limit)")
    keys.add_argument("--tpm", type=_count, default=0, help="create: tokens per minute, fleet-wide (0: no limit)")
    keys.add_argument("--concurrency", type=_count, default=0, help="create: requests at once (0: no limit)")
    keys.add_argument("--expires-in", type=_seconds, default=0, help="create: seconds until it expires (never)")
    keys.add_argument("--tls-ca", help="the fleet CA (PEM), when the control plane serves TLS")
    keys.add_argument("--tls-cert", help="an admin certificate (PEM): fleetlm ca issue --identity admin")
    keys.add_argument("--tls-key", help="its private key (PEM)")
    keys.set_defaults(run=_keys)

    status = sub.add_parser("status", help="a live view of the fleet: nodes, deployments, replicas (AdminService)")
    status.add_argument(
        "--controlplane", help="control plane host:port (default: the one fleetlm up runs, else 127.0.0.1:50051)"
    )
    status.add_argument("--once", action="store_true", help="print the view once and exit (as when piped)")
    status.add_argument("--json", action="store_true", help="print the fleet once as JSON and exit")
    status.add_argument("--interval", type=_period, default=2.0, help="seconds between refreshes (2)")
    status.add_argument(
        "--admin-token-file", help="file holding the admin token (or FLEETLM_ADMIN_TOKEN; default: fleetlm up's)"
    )
    status.add_argument("--tls-ca", help="the fleet CA (PEM), when the control plane serves TLS")
    status.add_argument("--tls-cert", help="an admin certificate (PEM): fleetlm ca issue --identity admin")
    status.add_argument("--tls-key", help="its private key (PEM)")
    status.add_argument(
        "--state-dir", default=default_state, help=f"where fleetlm up left operator.json ({default_state})"
    )
    status.set_defaults(run=_status)

    default_ca = os.path.join(default_state, "ca")
    ca = sub.add_parser("ca", help="the fleet certificate authority")
    ca.add_argument("action", choices=["init", "issue", "fingerprint", "revoke", "readmit"])
    ca.add_argument("--dir", default=default_ca, help=f"the CA's directory ({default_ca})")
    ca.add_argument("--identity", help="issue: controlplane/<id>, edge/<id>, node/<id> or admin (spiffe://fleetlm/...)")
    ca.add_argument("--dns", action="append", default=[], help="issue: a DNS name in the certificate (repeatable)")
    ca.add_argument("--ip", action="append", default=[], help="issue: an IP address in the certificate (repeatable)")
    ca.add_argument("--days", type=float, default=30, help="issue: validity in days (30)")
    ca.add_argument("--out", help="issue: write OUT.crt and OUT.key (0600)")
    ca.add_argument(
        "--node",
        help="revoke: the node whose certificates the control plane refuses from now on, and that no join token"
        " admits; readmit: the revoked node that may join again with a token",
    )
    ca.add_argument("--etcd", default="http://127.0.0.1:2379", help="revoke, readmit: etcd URL (http://127.0.0.1:2379)")
    ca.add_argument("--etcd-prefix", default="/fleetlm", help="revoke, readmit: etcd key prefix (/fleetlm)")
    _etcd_flags(ca)
    ca.set_defaults(run=_ca)

    jt = sub.add_parser("join-token", help="create, list or revoke the tokens nodes join the fleet with")
    jt.add_argument("action", choices=["create", "list", "revoke"])
    jt.add_argument("token_id", nargs="?", help="revoke: the token's id (fljt_<id>.…)")
    jt.add_argument("--etcd", default="http://127.0.0.1:2379", help="etcd URL (http://127.0.0.1:2379)")
    jt.add_argument("--etcd-prefix", default="/fleetlm", help="etcd key prefix (/fleetlm)")
    jt.add_argument("--ttl", type=float, default=3600, help="create: seconds the token is valid (3600)")
    jt.add_argument("--description", default="", help="create: what the token is for")
    jt.add_argument("--ca-dir", default=default_ca, help=f"the fleet CA, for its fingerprint ({default_ca})")
    _etcd_flags(jt)
    jt.set_defaults(run=_join_token)
    return top


def main(argv: list[str] | None = None) -> None:
    # grpc's C core prints its INFO lines (a failed TLS handshake, say) to stderr by default, outside the
    # services' log format and beside a command's one-line error; errors it still prints. Before grpc loads.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except Exception as exc:
        error = _operator_error(exc)
        if error is None:
            raise  # anything else is a bug: its traceback is wanted
        raise SystemExit(f"fleetlm {args.command}: {error}") from None


def _operator_error(exc: Exception) -> Exception | None:
    """The error of the operator's making that `exc` is (or that a task group's error is made of alone), for
    those that can only surface once a service runs, not in its checks before it starts: an address it cannot
    listen on. None for any other error."""
    from mesh.grpc_server import BindError

    if isinstance(exc, ExceptionGroup):
        bound, rest = exc.split(BindError)
        if bound is None or rest is not None:
            return None
        first: Exception = bound
        while isinstance(first, ExceptionGroup):  # task groups within task groups
            first = first.exceptions[0]
        return first
    return exc if isinstance(exc, BindError) else None
