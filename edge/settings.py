"""Edge settings: built once at start-up from flags and FLEETLM_EDGE_* environment variables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# A web origin as browsers send it in the Origin header: scheme, host, and a port only if not the default.
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://(\[[0-9a-fA-F:.]+\]|[^/\s:\[\]]+)(:[0-9]{1,5})?")


class EdgeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEETLM_EDGE_", allow_inf_nan=False)

    http_listen: str = Field("127.0.0.1:8080", description="host:port of the OpenAI-compatible HTTP API")
    grpc_listen: str = Field("127.0.0.1:50050", description="host:port of the gRPC InferenceService")
    controlplane: str = Field(
        "127.0.0.1:50051",
        description="host:port of the control plane, or several separated by commas: the edge follows the"
        " routing table from one and moves to the next when it goes away",
    )
    edge_id: str = Field("", description="this edge's name in the control plane's logs (default: host:grpc port)")
    request_timeout_seconds: float = Field(
        600.0, gt=0, description="longest a request may run on a node before it fails with BACKEND_TIMEOUT"
    )
    scale_from_zero_timeout_seconds: float = Field(
        120.0, ge=0, description="how long a request waits for a deployment with no ready replica to load"
    )
    breaker_failures: int = Field(
        1, ge=1, description="failures to reach a node in a row after which the edge skips it for a while"
    )
    breaker_cooldown_seconds: float = Field(
        1.0,
        gt=0,
        description="how long an unreachable node is skipped before one request probes it again; doubles after"
        " each failed probe, up to 30 s",
    )
    failover_seconds: float = Field(
        3.0,
        ge=0,
        description="how long a request that every replica refused because it was going away (unloading,"
        " unreachable) is routed again, with jittered backoff, before the client hears the error",
    )
    placement_timeout_seconds: float = Field(5.0, gt=0, description="deadline of placement calls")
    shutdown_grace_seconds: float = Field(5.0, ge=0, description="time in-flight requests get at shutdown")
    require_api_key: bool = Field(
        False,
        description="refuse OpenAI HTTP and gRPC requests without a valid API key (AdminService.CreateApiKey);"
        " /health stays open. Needs --auth-secret-file",
    )
    auth_secret_file: Path | None = Field(
        None, description="the fleet secret (the control planes' --auth-secret-file) API keys are hashed with"
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="largest request body; above it 413 before the body is read"
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="time a request body has to arrive after its headers; then 408"
    )
    header_timeout_seconds: float = Field(10.0, gt=0, description="time a request's headers have to arrive; then 408")
    keep_alive_seconds: int = Field(5, ge=1, description="how long an idle kept-alive HTTP connection is held")
    metrics: bool = Field(
        True,
        description="serve Prometheus metrics at /metrics on the HTTP port and count every request for them"
        " (false: neither, and no work per request)",
    )
    cors_origins: str = Field(
        "",
        description="origins web pages may call the HTTP API from (CORS), comma-separated, such as"
        " https://app.example.com, or * for any; empty: no CORS headers, so browsers refuse cross-origin calls",
    )
    node_streams: bool = Field(
        True,
        description="carry every Generate call to a node on one long-lived stream per node (MultiplexService),"
        " which saves each request grpc's per-call work; false: a gRPC call per request",
    )
    log_level: str = Field("INFO", description="log level")
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text, or one JSON object per line (json), on stderr"
    )

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        cors_origins(value)
        return value


def cors_origins(value: str) -> list[str]:
    """The origins of the setting, in order; ValueError naming the first that is not one."""
    origins = [origin.strip() for origin in value.split(",") if origin.strip()]
    for origin in origins:
        if origin != "*" and not ORIGIN.fullmatch(origin):
            raise ValueError(
                f"{origin!r} is not an origin: scheme://host or scheme://host:port, no path (or * for any)"
            )
    return origins
