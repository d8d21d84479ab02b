"""`fleetlm up`: the whole mesh on one machine, as one process tree.

Starts, in order and each only once the previous is ready: embedded etcd, the control plane, one node
agent serving the default model, the edge. Stops in the reverse order on Ctrl-C / SIGTERM (at once, even
while it still waits for the models to load), or when any child dies, and leaves no process and no bound
port behind. A catalog whose llama.cpp weights are not on this machine is refused before anything starts.

On loopback (the default) everything is plaintext, as llama-server and Ollama are on localhost. Bound
to any other address (or with --tls) it makes a fleet CA in the state directory, issues a certificate to
each component and one for an operator (`tls/admin.crt`, for grpcurl), and runs every link over TLS:
mutual TLS between the components, HTTPS and TLS gRPC for clients, which trust `ca/ca.crt`. It then
also requires credentials (as --require-auth does on loopback): a fleet secret and an admin token are made
in `auth/`, every /v1 and gRPC request needs an API key (`fleetlm keys create`) and every AdminService RPC
the admin token. The embedded etcd always listens on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from launcher.admin_access import AccessError, find_target, write_operator_file
from launcher.default_model import default_model_path, write_default_catalog
from launcher.processes import (
    Child,
    Interrupted,
    RestartBudget,
    etcd_argv,
    etcd_healthy,
    port_free,
    tcp_open,
    wait_until,
)
from launcher.status import fetch, unplaceable
from mesh import logs
from mesh.catalog import CatalogError, load_catalog
from mesh.tls import is_loopback


def _fleetlm(*args: str) -> list[str]:
    # -P: the working directory stays off the module path, so that a folder there named like one of
    # fleetlm's packages (a clone called `fleetlm`, say) does not stand in for it.
    return [sys.executable, "-P", "-m", "launcher", *args]


def _models_ready(http: str, names: list[str], context: ssl.SSLContext | None = None, keyed: bool = False) -> bool:
    """Whether every model of `names` (the catalog's) is loaded (or failed); deployments kept from an earlier
    start are not waited for (the banner names them). With API keys required (`keyed`) `fleetlm up` holds
    none: it reads the edge's /health, which stays open, and waits until every one is ready there."""
    if keyed:
        with urllib.request.urlopen(f"{http}/health", timeout=2, context=context) as reply:
            return set(names) <= set(json.load(reply).get("ready_models", []))
    with urllib.request.urlopen(f"{http}/v1/models", timeout=2, context=context) as reply:
        states = {m["id"]: m["state"] for m in json.load(reply)["data"]}
    return all(states.get(name) in ("ready", "failed") for name in names)


class LoadProgress:
    """Prints how the models' load goes while `fleetlm up` waits for them: a line when a replica's state or
    load progress moves (in llama.cpp's 5% steps), or every 10 s for an engine that cannot tell."""

    def __init__(self, state: Path, models: list[str]) -> None:
        self._models = models  # the catalog's
        self._target = find_target(argparse.Namespace(controlplane=None, state_dir=str(state), tls_ca=None,
                                                      tls_cert=None, tls_key=None, admin_token_file=None))  # fmt: skip
        self._shown: dict[tuple[str, str], str] = {}
        self._next_check = 0.0
        self._next_placement_check = 0.0

    def show(self, now: bool = False) -> bool:
        """Print what changed (at most every 0.5 s unless `now`); a control plane that does not answer yet
        is not an error. RuntimeError for a catalog model that fits on no node (checked every 2 s): here it
        never will, and waiting out the timeout would only hide why. Always False, so that it can lead a
        readiness check."""
        if not now and time.monotonic() < self._next_check:
            return False
        self._next_check = time.monotonic() + 0.5
        try:
            snap = asyncio.run(fetch(self._target))
        except AccessError:
            return False
        # Catalog models that want a replica and have none placed: the node here is the fleet, and the
        # catalog all it runs, so a model that fits on it now never will.
        unplaced = [
            d["name"] for d in snap["deployments"] if d["name"] in self._models and d["replicas"] and not d["assigned"]
        ]
        if unplaced and time.monotonic() >= self._next_placement_check:
            self._next_placement_check = time.monotonic() + 2
            try:
                nowhere = asyncio.run(unplaceable(self._target, unplaced))
                if nowhere:
                    # The reconciler may have placed it between the snapshot and the verdicts (which then
                    # say the node "already runs a replica"): only a model still unassigned now is stuck.
                    snap = asyncio.run(fetch(self._target))
                    nowhere = {
                        name: why for name, why in nowhere.items()
                        if any(d["name"] == name and not d["assigned"] for d in snap["deployments"])
                    }  # fmt: skip
            except AccessError:
                nowhere = {}
            for name in unplaced:
                if name in nowhere:
                    raise RuntimeError(f"model '{name}' fits on no node ({nowhere[name]})")
        for replica in snap["replicas"]:
            key = (replica["node"], replica["model"])
            if replica["state"] != "loading":
                line = replica["state"] + (f": {replica['error']}" if replica["error"] else "")
            elif replica["load_progress"] is not None:
                line = f"loading {replica['load_progress'] * 100:.0f}%"
            else:
                line = f"loading ({(replica['loading_seconds'] or 0) // 10 * 10:.0f}s)"
            if self._shown.get(key) != line:
                self._shown[key] = line
                print(f"  {replica['model']} on {replica['node']}: {line}", flush=True)
        return False

    def others(self) -> list[str]:
        """Deployments that are not the catalog's: kept in etcd from an earlier start (another catalog, or
        DeployModel), and running beside it. [] when the control plane does not answer."""
        try:
            snap = asyncio.run(fetch(self._target))
        except AccessError:
            return []
        return sorted(d["name"] for d in snap["deployments"] if d["name"] not in self._models)


def _said(level: int, message: str) -> None:
    """A line from the supervisor among its components' log lines, in their format (time, who, level; JSON
    with --log-format json), so that a restart can be placed among what the components logged around it."""
    log_format = os.environ.get("FLEETLM_NODE_LOG_FORMAT", "text")  # set for every component by --log-format
    print(logs.formatted("up", level, "fleetlm up", message, log_format), file=sys.stderr, flush=True)


def _supervise(children: list[Child], stop: threading.Event) -> int:
    """Until `stop`: a component that exits is started again (`RestartBudget`: after 1 s, then longer);
    the others reconnect to it on their own, as they would to one restarted by an operator. Returns 0, or
    1 once a component has died too often to go on."""
    budgets = {child.name: RestartBudget() for child in children}
    due: dict[str, float] = {}  # dead children and when they start again
    while not stop.wait(0.2):
        for child in children:
            if child.name in due:
                if time.monotonic() >= due[child.name]:
                    del due[child.name]
                    child.start_again()
                    _said(logging.INFO, f"{child.name} started again")
                continue
            if child.alive():
                continue
            budget = budgets[child.name]
            delay = budget.died()
            exited = f"{child.name} exited with code {child.proc.returncode}"
            if delay is None:
                _said(logging.ERROR, f"{exited}, {budget.deaths} times within {budget.window_seconds:g}s; stopping")
                return 1
            _said(logging.WARNING, f"{exited}; starting it again in {delay:g}s")
            due[child.name] = time.monotonic() + delay
    return 0


def _issue_certificates(state: Path, host: str, node_id: str) -> dict[str, list[str]]:
    """The fleet CA in `state/ca` (made once), and a fresh certificate for each component and for an
    operator in `state/tls`; returns each component's TLS flags. Names: localhost, this machine's name and
    every address it has, so clients reach it by any of them."""
    from mesh.fleet_ca import CA_CERT, FleetCA, identity_uri, write_private, write_public

    ca = FleetCA.load_or_create(state / "ca")
    dns = sorted({"localhost", socket.gethostname(), socket.getfqdn()})
    ips = {"127.0.0.1"} | {
        a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET
    }
    if host not in ("0.0.0.0", "::", ""):
        ips.add(host)
    tls = state / "tls"
    flags: dict[str, list[str]] = {}
    for name, identity in (
        ("controlplane", identity_uri("controlplane", "up")),
        ("node", identity_uri("node", node_id)),
        ("edge", identity_uri("edge", "up")),
        ("admin", identity_uri("admin")),
    ):
        cert, key = ca.issue(identity, dns, sorted(ips))
        write_private(tls / f"{name}.key", key)
        write_public(tls / f"{name}.crt", cert)
        flags[name] = ["--tls-cert", str(tls / f"{name}.crt"), "--tls-key", str(tls / f"{name}.key"),
                       "--tls-ca", str(state / "ca" / CA_CERT)]  # fmt: skip
    return flags


_STATE_LOCK: list[Any] = []  # the open lock file of this process's state directory (_hold_state), held until exit


def _hold_state(state: Path) -> str:
    """Take the state directory for this `fleetlm up` (a lock the kernel lets go when the process ends, however
    it ends): "" once taken, else what is known of the `up` that holds it (" (pid N)"). A second `up` on the
    same state would find etcd's data held, and would have pointed `fleetlm status` at itself meanwhile."""
    lock = open(state / "up.lock", "a+")  # noqa: SIM115 - held as long as this process
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        return f" (pid {holder})" if holder.isdigit() else " (its pid unknown)"
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    _STATE_LOCK.append(lock)
    return ""


def _on_path(program: str) -> bool:
    """Whether `program` (this process's argv[0]) is what a shell finds as `fleetlm`."""
    found = shutil.which("fleetlm")
    return found is not None and Path(found).resolve() == Path(program).resolve()


def run(args: argparse.Namespace) -> int:
    host = args.host
    state = Path(args.state_dir).expanduser()
    try:
        state.mkdir(parents=True, exist_ok=True)
        in_use = _hold_state(state)
    except OSError as exc:
        print(f"fleetlm up: cannot use {state} as the state directory: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if in_use:
        print(f"fleetlm up: another fleetlm up runs with the state directory {state}{in_use}; stop it, or give"
              " this one another --state-dir", file=sys.stderr)  # fmt: skip
        return 2
    ports = {
        "edge HTTP": args.http_port,
        "edge gRPC": args.grpc_port,
        "control plane": args.controlplane_port,
        "node agent": args.node_port,
        "control plane metrics": args.controlplane_metrics_port,
        "node agent metrics": args.node_metrics_port,
    }
    if not args.etcd:
        ports |= {"etcd client": args.etcd_port, "etcd peer": args.etcd_port + 1}
    by_port: dict[int, list[str]] = {}
    for name, port in ports.items():
        by_port.setdefault(port, []).append(name)
    shared = [f"{' and '.join(names)} ({port})" for port, names in by_port.items() if len(names) > 1]
    if shared:  # each would take the port from the other (the etcd peer port is the client port + 1)
        print(f"fleetlm up: one port given to two components: {', '.join(shared)}", file=sys.stderr)
        return 2
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
    # The one node is this machine: weights that are not here would never load, and `up` would wait for them.
    missing = [e for e in entries if e.engine == "llamacpp" and not Path(e.path).is_file()]
    if missing:
        where = "; ".join(f"'{e.name}': no file at {e.path}" for e in missing)
        print(f"fleetlm up: the model catalog {catalog} names weights this machine does not have ({where})",
              file=sys.stderr)  # fmt: skip
        return 2
    # The one node may be assigned any deployment: it looks for weights where the catalog says they are, and
    # where the default model is (a deployment of it kept from an earlier start runs beside another catalog).
    folders = {str(Path(e.path).parent) for e in entries} | {str(default_model_path().parent)}
    models_dirs = [arg for d in sorted(folders) for arg in ("--models-dir", d)]

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    children: list[Child] = []
    # etcd holds the fleet's state and has no credentials here: it listens on loopback only, whatever --host.
    etcd_url = args.etcd or f"http://127.0.0.1:{args.etcd_port}"
    cp = f"{host}:{args.controlplane_port}"
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # where this process reaches the components
    node_id = socket.gethostname()
    use_tls = args.tls or not is_loopback(f"{host}:0")
    tls: dict[str, list[str]] = {"controlplane": [], "node": [], "edge": []}
    context: ssl.SSLContext | None = None
    if use_tls:
        tls = _issue_certificates(state, host, node_id)
        context = ssl.create_default_context(cafile=str(state / "ca" / "ca.crt"))
    auth: dict[str, list[str]] = {"controlplane": [], "edge": []}
    require_auth = args.require_auth or use_tls
    if require_auth:
        from mesh.auth import create_secret_file

        for name in ("fleet.secret", "admin.token"):
            if not (state / "auth" / name).exists():
                create_secret_file(state / "auth" / name)
        secret, token = str(state / "auth" / "fleet.secret"), str(state / "auth" / "admin.token")
        auth = {"controlplane": ["--auth-secret-file", secret, "--admin-token-file", token],
                "edge": ["--require-api-key", "--auth-secret-file", secret]}  # fmt: skip
    # Where `fleetlm status` (and an operator on this machine) reaches this fleet, with which credentials.
    operator_tls = dict(zip(("tls_cert", "tls_key", "tls_ca"), tls["admin"][1::2], strict=True)) if use_tls else {}
    admin_token = str(state / "auth" / "admin.token") if require_auth else ""
    write_operator_file(state, f"{local}:{args.controlplane_port}", operator_tls, admin_token)
    scheme = "https" if use_tls else "http"
    http = f"{scheme}://{local}:{args.http_port}"
    code = 0
    try:
        if not args.etcd:
            log = open(state / "etcd.log", "ab")  # noqa: SIM115 - lives as long as etcd
            etcd = Child("etcd", etcd_argv(state / "etcd", "127.0.0.1", args.etcd_port, args.etcd_port + 1), log)
            children.append(etcd)
            wait_until(
                lambda: etcd_healthy("127.0.0.1", args.etcd_port),
                60,
                f"etcd to serve (its log: {state / 'etcd.log'})",
                etcd,
                stop,
            )
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
                "--metrics-listen",
                f"{host}:{args.controlplane_metrics_port}",
                *tls["controlplane"],
                *auth["controlplane"],
            ),
        )
        children.append(controlplane)
        wait_until(lambda: tcp_open(local, args.controlplane_port), 60, "the control plane", controlplane, stop)
        node = Child(
            "node",
            _fleetlm(
                "node",
                *models_dirs,
                "--listen",
                f"{host}:{args.node_port}",
                "--controlplane",
                f"{local}:{args.controlplane_port}",
                "--node-id",
                node_id,
                "--metrics-listen",
                f"{host}:{args.node_metrics_port}",
                *(["--advertise", f"{local}:{args.node_port}"] if local != host else []),
                *(["--threads", str(args.threads)] if args.threads else []),
                *tls["node"],
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
                f"{local}:{args.controlplane_port}",
                *(["--cors-origins", args.cors_origins] if args.cors_origins else []),
                *tls["edge"],
                *auth["edge"],
            ),
        )
        children.append(edge)
        wait_until(lambda: tcp_open(local, args.http_port), 60, "the edge", edge, stop)
        names = [e.name for e in entries]
        progress = LoadProgress(state, names)
        wait_until(
            lambda: progress.show() or _models_ready(http, names, context, require_auth),
            300,
            "the models to load",
            node,
            stop,
        )
        progress.show(now=True)  # the models' final states, which the last check may not have fetched
        model = ", ".join(e.name for e in entries)
        others = progress.others()
        etcd_note = "" if args.etcd else f"   (data in {state / 'etcd'})"
        if use_tls:
            ca_file, admin = state / "ca" / "ca.crt", state / "tls" / "admin"
            curl, grpcurl = f"curl --cacert {ca_file}", f"grpcurl -cacert {ca_file}"
            admin_grpcurl = f"{grpcurl} -cert {admin}.crt -key {admin}.key"
            tls_note = f"\n  TLS               every link; clients trust {ca_file}; operators use {admin}.crt/.key"
        else:
            curl, grpcurl = "curl", "grpcurl -plaintext"
            admin_grpcurl, tls_note = grpcurl, ""
        if require_auth:
            token_file = state / "auth" / "admin.token"
            admin_grpcurl += f' -H "authorization: Bearer $(cat {token_file})"'
        default_state = Path(os.environ.get("XDG_STATE_HOME", "~/.local/state"), "fleetlm").expanduser()
        status_dir = "" if state == default_state else f" --state-dir {state}"
        # `fleetlm` as this shell finds it: the venv's, when the venv is not on PATH (`make up` runs it so)
        fleetlm = "fleetlm" if _on_path(sys.argv[0]) else sys.argv[0]
        try_it = f"{curl} {http}/v1/models"
        if require_auth:  # fleetlm keys finds the control plane and the credentials in the operator file
            tls_note += f"\n  API keys          required; make one: {fleetlm} keys create NAME{status_dir}"
            try_it = f'{curl} -H "Authorization: Bearer $KEY" {http}/v1/models, KEY from {fleetlm} keys create'
        cp_local = f"{local}:{args.controlplane_port}"
        if others:  # said, not removed: an operator's DeployModel is kept across starts as a catalog's is
            method = "fleetlm.controlplane.v1.AdminService/UndeployModel"
            undeploy = f'{admin_grpcurl} -d \'{{"name": "NAME"}}\' {cp_local} {method}'
            tls_note += (
                f"\n  also deployed     {', '.join(others)}   (kept from an earlier start; not in this catalog;"
                f" to remove one: {undeploy})"
            )
        metrics = f"{scheme}://{local}"
        print(
            f"""
fleetlm is up.
  OpenAI HTTP API   {http}/v1        (try: {try_it})
  gRPC Inference    {local}:{args.grpc_port}   (reflection on: {grpcurl} {local}:{args.grpc_port} list)
  control plane     {cp_local}   ({admin_grpcurl} {cp_local} fleetlm.controlplane.v1.AdminService/ListNodes)
  node agent        {local}:{args.node_port}
  metrics           {http}/metrics (edge), {metrics}:{args.controlplane_metrics_port}/metrics (control plane),
                    {metrics}:{args.node_metrics_port}/metrics (node)   (Prometheus: docker/prometheus.yml)
  etcd              {etcd_url}{etcd_note}
  deployments       {model}   (catalog {catalog}){tls_note}
  status            {fleetlm} status{status_dir}   (nodes, deployments, replicas; --json for scripts)
Press Ctrl-C to stop.
""",
            flush=True,
        )
        code = _supervise(children, stop)
    except Interrupted as exc:  # Ctrl-C or SIGTERM before everything was up: stop now, not after the wait
        print(f"fleetlm up: {exc}; stopping", file=sys.stderr)
        code = 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"fleetlm up: {exc}; stopping", file=sys.stderr)
        code = 1
    finally:
        # Reverse order: the edge stops taking requests before the node goes, etcd goes last.
        for child in reversed(children):
            child.stop(grace=10)
        print("fleetlm stopped.", flush=True)
    return code
