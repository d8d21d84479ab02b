"""Node-agent settings: built once at start-up from flags and FLEETLM_NODE_* environment variables."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEETLM_NODE_", allow_inf_nan=False)

    node_id: str = Field(default_factory=socket.gethostname, description="stable id of this node in the fleet")
    listen: str = Field("127.0.0.1:50061", description="host:port the node's InferenceService binds")
    advertise: str | None = Field(
        None,
        description="host:port the edge dials to reach this node; default: the listen address, with a"
        " wildcard host replaced by this machine's host name",
    )
    controlplane: str = Field(
        "127.0.0.1:50051",
        description="host:port of the control plane, or of several separated by commas (the agent uses the"
        " first that answers and moves to the next when it goes away), or a DNS name with several records",
    )
    catalog: Path | None = Field(
        None, description="YAML catalog of models this node always serves (besides its assignments)"
    )
    models_dirs: list[Path] = Field(
        default_factory=list,
        description="directories scanned for model files the control plane may assign; default: the"
        " catalog's directory",
    )
    inventory_override: Path | None = Field(
        None, description="YAML that replaces parts of the measured inventory (ram_total_gib, gpus, ...)"
    )
    threads: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, description="CPU threads per llama.cpp context"
    )
    unified_kv: bool = Field(
        False,
        description="one KV buffer shared by a llama.cpp replica's sequences: a prompt can reuse a prefix that"
        " any slot holds, even a running one; but a batched output may differ from the same request alone",
    )
    engine_idle: bool = Field(
        True,
        description="run llama.cpp's compute threads in Linux's SCHED_IDLE class: the threads that move tokens"
        " (gRPC, HTTP) and everything else on the box take a core from them at once; off: engine_nice",
    )
    engine_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="with engine_idle off, nice value of the threads that run llama.cpp's compute; above 0"
        " lets the threads that move tokens (gRPC, HTTP) run first when the engine keeps every core busy;"
        " 0 leaves them equal",
    )
    sglang_python: str = Field(
        default_factory=lambda: sys.executable,
        description="the Python that runs `-m sglang.launch_server` (SGLang often lives in its own venv);"
        " default: the agent's own",
    )
    engine_health_seconds: float = Field(
        5.0,
        gt=0,
        description="how often an OpenAI-compatible engine server is health-checked; three failures in a row"
        " fail the replica",
    )
    rpc_timeout_seconds: float = Field(5.0, gt=0, description="deadline of calls to the control plane")
    shutdown_grace_seconds: float = Field(5.0, ge=0, description="time in-flight requests get at shutdown")
    tls_cert: Path | None = Field(
        None,
        description="this node's certificate (PEM, spiffe://fleetlm/node/<id>): its InferenceService then speaks"
        " mutual TLS only, and it calls the control plane with it; files are re-read when they change",
    )
    tls_key: Path | None = Field(None, description="private key (PEM) of --tls-cert; never logged")
    tls_ca: Path | None = Field(None, description="the fleet CA (PEM) peers' certificates must be signed by")
    join_token: SecretStr | None = Field(
        None,
        description="join token (`fleetlm join-token create`): the node makes its own key and gets its"
        " certificate from the control plane's join address, kept in --state-dir; never logged",
    )
    ca_fingerprint: str | None = Field(
        None, description="sha256:... of the fleet CA, pinned for the first contact of --join-token"
    )
    join_address: str | None = Field(None, description="host:port of the control plane's --join-listen")
    state_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "fleetlm",
        description="where the node keeps its key and certificate (identity/, files 0600)",
    )
    insecure_plaintext: bool = Field(
        False, description="serve plaintext gRPC on a non-loopback --listen (refused without it unless TLS is on)"
    )
    metrics_listen: str = Field(
        "127.0.0.1:9401",
        description='host:port of the Prometheus metrics port (/metrics; port 0 picks a free one, logged); "" for'
        " none. Beyond loopback it speaks HTTPS with the TLS files, or needs --insecure-plaintext",
    )
    log_level: str = Field("INFO", description="log level")
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text, or one JSON object per line (json), on stderr"
    )

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        # The control plane's rule (RegisterNode refuses any other id): refused here at start, with the reason,
        # rather than by every control plane at every attempt.
        if not value or "/" in value:
            raise ValueError(f"the node id {value!r} must not be empty nor contain '/'")
        return value
