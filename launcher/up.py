"""`fleetlm up`: the whole mesh on one machine, as one process tree.

Starts, in order and each only once the previous is ready: embedded etcd, the control plane, one node
agent serving the default model, the edge. Stops in the reverse order on Ctrl-C / SIGTERM, or when any
child dies, and leaves no process and no bound port behind.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import urllib.request
from pathlib import Path

from launcher.default_model import write_default_catalog
from launcher.processes import Child, etcd_argv, port_free, tcp_open, wait_until
from mesh.catalog import CatalogError, load_catalog


def _fleetlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher", *args]


def _models_ready(http: str) -> bool:
    with urllib.request.urlopen(f"{http}/v1/models", timeout=2) as reply:
        data = json.load(reply)["data"]
    return bool(data) and all(m["state"] in ("ready", "failed") for m in data)


def run(args: argparse.Namespace) -> int:
    host = args.host
    state = Path(args.state_dir).expanduser()
    state.mkdir(parents=True, exist_ok=True)
    ports = {
        "edge HTTP": args.http_port,
        "edge gRPC": args.grpc_port,
        "control plane": args.controlplane_port,
        "node agent": args.node_port,
    }
    if not args.etcd:
        ports |= {"etcd client": args.etcd_port, "etcd peer": args.etcd_port + 1}
    busy = [f"{name} ({host}:{port})" for name, port in ports.items() if not port_free(host, port)]
    if busy:
        print(f"fleetlm up: ports already in use: {', '.join(busy)}", file=sys.stderr)
        return 2
    catalog = Path(args.catalog) if args.catalog else write_default_catalog(state / "models.yaml")
    try:
        entries = load_catalog(catalog)
    except CatalogError as exc:
        print(f"fleetlm up: {exc}", file=sys.stderr)
        return 2
    # The one node may be assigned any deployment: it looks for weights where the catalog says they are.
    models_dirs = [arg for d in sorted({str(Path(e.path).parent) for e in entries}) for arg in ("--models-dir", d)]

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    children: list[Child] = []
    etcd_url = args.etcd or f"http://{host}:{args.etcd_port}"
    cp = f"{host}:{args.controlplane_port}"
    http = f"http://{host}:{args.http_port}"
    code = 0
    try:
        if not args.etcd:
            log = open(state / "etcd.log", "ab")  # noqa: SIM115 - lives as long as etcd
            etcd = Child("etcd", etcd_argv(state / "etcd", host, args.etcd_port, args.etcd_port + 1), log)
            children.append(etcd)
            wait_until(lambda: tcp_open(host, args.etcd_port), 30, "etcd to listen", etcd)
        controlplane = Child(
            "controlplane",
            _fleetlm(
                "controlplane",
                "--listen",
                cp,
                "--etcd",
                etcd_url,
                "--lease-ttl",
                str(args.lease_ttl),
                "--deployments",
                str(catalog),
            ),
        )
        children.append(controlplane)
        wait_until(lambda: tcp_open(host, args.controlplane_port), 60, "the control plane", controlplane)
        node = Child(
            "node",
            _fleetlm(
                "node",
                *models_dirs,
                "--listen",
                f"{host}:{args.node_port}",
                "--controlplane",
                cp,
                *(["--threads", str(args.threads)] if args.threads else []),
            ),
        )
        children.append(node)
        edge = Child(
            "edge",
            _fleetlm(
                "edge",
                "--http-listen",
                f"{host}:{args.http_port}",
                "--grpc-listen",
                f"{host}:{args.grpc_port}",
                "--controlplane",
                cp,
            ),
        )
        children.append(edge)
        wait_until(lambda: tcp_open(host, args.http_port), 60, "the edge", edge)
        wait_until(lambda: _models_ready(http), 300, "the models to load", node)
        model = ", ".join(e.name for e in entries)
        etcd_note = "" if args.etcd else f"   (data in {state / 'etcd'})"
        print(
            f"""
fleetlm is up.
  OpenAI HTTP API   {http}/v1        (try: curl {http}/v1/models)
  gRPC Inference    {host}:{args.grpc_port}   (reflection on: grpcurl -plaintext {host}:{args.grpc_port} list)
  control plane     {cp}   (grpcurl -plaintext {cp} fleetlm.controlplane.v1.AdminService/ListNodes)
  node agent        {host}:{args.node_port}
  etcd              {etcd_url}{etcd_note}
  deployments       {model}   (catalog {catalog})
Press Ctrl-C to stop.
""",
            flush=True,
        )
        while not stop.wait(0.5):
            dead = [c for c in children if not c.alive()]
            if dead:
                print(
                    f"fleetlm up: {dead[0].name} exited with code {dead[0].proc.returncode}; stopping",
                    file=sys.stderr,
                )
                code = 1
                break
    except (RuntimeError, TimeoutError) as exc:
        print(f"fleetlm up: {exc}; stopping", file=sys.stderr)
        code = 1
    finally:
        # Reverse order: the edge stops taking requests before the node goes, etcd goes last.
        for child in reversed(children):
            child.stop(grace=10)
        print("fleetlm stopped.", flush=True)
    return code
