"""`fleetlm` command line. Flags override the FLEETLM_* environment variables of each component."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pydantic import ValidationError


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _settings(cls: type, values: dict[str, Any]) -> Any:
    try:
        return cls(**values)
    except ValidationError as exc:
        raise SystemExit(f"fleetlm: invalid settings:\n{exc}") from None


def _controlplane(args: argparse.Namespace) -> None:
    from controlplane.server import main
    from controlplane.settings import ControlPlaneSettings

    values = _given(
        args, "listen", "advertise", "etcd", "etcd_prefix", "deployments", "placement_strategy", "log_level"
    )
    if args.leader_ttl is not None:
        values["leader_ttl_seconds"] = args.leader_ttl
    if args.lease_ttl is not None:
        values["lease_ttl_seconds"] = args.lease_ttl
    if args.startup_grace is not None:
        values["startup_grace_seconds"] = args.startup_grace
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
        "engine_nice",
        "sglang_python",
        "engine_health_seconds",
        "inventory_override",
        "log_level",
    )
    if args.unified_kv:
        values["unified_kv"] = True
    if args.models_dir:
        values["models_dirs"] = args.models_dir
    main(_settings(NodeSettings, values))


def _edge(args: argparse.Namespace) -> None:
    from edge.server import main
    from edge.settings import EdgeSettings

    values = _given(args, "http_listen", "grpc_listen", "controlplane", "log_level")
    if args.request_timeout is not None:
        values["request_timeout_seconds"] = args.request_timeout
    if args.scale_from_zero_timeout is not None:
        values["scale_from_zero_timeout_seconds"] = args.scale_from_zero_timeout
    if args.breaker_cooldown is not None:
        values["breaker_cooldown_seconds"] = args.breaker_cooldown
    if args.failover_seconds is not None:
        values["failover_seconds"] = args.failover_seconds
    main(_settings(EdgeSettings, values))


def _up(args: argparse.Namespace) -> None:
    from launcher.up import run

    sys.exit(run(args))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fleetlm", description="LLM serving across a fleet of machines.")
    sub = top.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run etcd, control plane, one node agent and the edge on this machine")
    up.add_argument("--host", default="127.0.0.1", help="address every component binds (default 127.0.0.1)")
    up.add_argument("--http-port", type=int, default=8080, help="edge OpenAI HTTP port (8080)")
    up.add_argument("--grpc-port", type=int, default=50050, help="edge gRPC port (50050)")
    up.add_argument("--controlplane-port", type=int, default=50051, help="control plane port (50051)")
    up.add_argument("--node-port", type=int, default=50061, help="node agent port (50061)")
    up.add_argument("--etcd-port", type=int, default=2379, help="embedded etcd client port; peer is +1 (2379)")
    up.add_argument("--etcd", help="URL of an existing etcd to use instead of the embedded one")
    up.add_argument(
        "--catalog", help="deployments to run, models.yaml (default: SmolLM2-135M-Instruct as smollm2-135m)"
    )
    up.add_argument("--threads", type=int, help="CPU threads for llama.cpp (default: all cores)")
    up.add_argument("--lease-ttl", type=int, default=10, help="node lease TTL in seconds (10)")
    default_state = os.path.join(os.environ.get("XDG_STATE_HOME", "~/.local/state"), "fleetlm")
    up.add_argument("--state-dir", default=default_state, help=f"etcd data and logs ({default_state})")
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
    node.add_argument("--engine-nice", type=int, help="nice value of llama.cpp's compute threads, 0-19 (10)")
    node.add_argument("--sglang-python", help="Python that runs sglang.launch_server (the agent's own)")
    node.add_argument("--engine-health-seconds", type=float, help="health-check period of engine servers (5)")
    node.add_argument("--log-level")
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
    edge.set_defaults(run=_edge)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)
