"""Edge settings: built once at start-up from flags and FLEETLM_EDGE_* environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class EdgeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEETLM_EDGE_")

    http_listen: str = Field("127.0.0.1:8080", description="host:port of the OpenAI-compatible HTTP API")
    grpc_listen: str = Field("127.0.0.1:50050", description="host:port of the gRPC InferenceService")
    controlplane: str = Field("127.0.0.1:50051", description="host:port of the control plane")
    request_timeout_seconds: float = Field(
        600.0, gt=0, description="longest a request may run on a node before it fails with BACKEND_TIMEOUT"
    )
    scale_from_zero_timeout_seconds: float = Field(
        120.0, ge=0, description="how long a request waits for a deployment with no ready replica to load"
    )
    route_cache_seconds: float = Field(
        1.0,
        ge=0,
        description="how long the edge reuses the control plane's answer for a model served by a single"
        " replica (any refusal by that replica drops it); 0: ask for every request",
    )
    placement_timeout_seconds: float = Field(5.0, gt=0, description="deadline of placement calls")
    shutdown_grace_seconds: float = Field(5.0, ge=0, description="time in-flight requests get at shutdown")
    log_level: str = Field("INFO", description="log level")
