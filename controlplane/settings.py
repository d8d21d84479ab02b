"""Control-plane settings: built once at start-up from flags and FLEETLM_CP_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from controlplane.etcd_store import EtcdAccess


class ControlPlaneSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEETLM_CP_", allow_inf_nan=False)

    listen: str = Field("127.0.0.1:50051", description="host:port the control plane's gRPC server binds")
    advertise: str | None = Field(
        None,
        description="host:port other control planes reach this one at (followers forward writes to the"
        " leader there); default: the listen address, with a wildcard host replaced by this machine's name",
    )
    leader_ttl_seconds: int = Field(
        3,
        ge=2,
        le=60,
        description="TTL of the leader's etcd lease: when the leader dies, another control plane leads about"
        " this long after (at once when it stops cleanly); the leader renews every third of it",
    )
    etcd: str = Field("http://127.0.0.1:2379", description="URL of an etcd v3 endpoint")
    etcd_prefix: str = Field("/fleetlm", description="etcd key prefix under which all state is kept")
    etcd_ca: Path | None = Field(None, description="CA (PEM) of etcd's server certificate: TLS to etcd")
    etcd_cert: Path | None = Field(None, description="client certificate (PEM) for an etcd with --client-cert-auth")
    etcd_key: Path | None = Field(None, description="private key (PEM) of --etcd-cert; never logged")
    etcd_user: str | None = Field(None, description="etcd user (etcd's own authentication)")
    etcd_password: SecretStr | None = Field(
        None, description="password of --etcd-user (FLEETLM_CP_ETCD_PASSWORD, or --etcd-password-file); never logged"
    )
    etcd_password_file: Path | None = Field(None, description="file holding the password of --etcd-user")
    lease_ttl_seconds: int = Field(
        10, ge=2, le=3600, description="TTL of a node's registration lease; a silent node leaves after it"
    )
    startup_grace_seconds: float | None = Field(
        None,
        ge=0,
        description="after start-up, how long to wait for nodes that hold assignments to register again before"
        " taking them as gone (their replicas are then placed elsewhere); default: the lease TTL + 5 s",
    )
    resync_interval_seconds: float = Field(
        30.0, gt=0, description="period of the full reload of fleet state that heals missed watch events"
    )
    deployments: str | None = Field(None, description="YAML catalog of deployments created (or updated) at start-up")
    placement_strategy: Literal["spread", "binpack"] = Field(
        "spread", description="spread replicas across nodes, or pack them onto the fewest"
    )
    ram_reserve_gib: float = Field(2.0, ge=0, description="RAM per node never assigned to replicas")
    vram_reserve_gib: float = Field(0.5, ge=0, description="GPU memory per GPU never assigned to replicas")
    reconcile_interval_seconds: float = Field(
        2.0, gt=0, description="period of the desired-state pass (it also runs on every change)"
    )
    shutdown_grace_seconds: float = Field(5.0, ge=0, description="time in-flight RPCs get at shutdown")
    tls_cert: Path | None = Field(
        None,
        description="certificate (PEM) of the gRPC server, and of this control plane as a client; with --tls-key"
        " and --tls-ca the server speaks mutual TLS only; files are re-read when they change",
    )
    tls_key: Path | None = Field(None, description="private key (PEM) of --tls-cert; never logged")
    tls_ca: Path | None = Field(None, description="the fleet CA (PEM) client certificates must be signed by")
    ca_dir: Path | None = Field(
        None, description="directory of the fleet CA (ca.crt, ca.key) with which Join signs nodes' certificates"
    )
    node_cert_lifetime_seconds: float = Field(
        30 * 86400,
        ge=10,
        le=3650 * 86400,  # the fleet CA's own lifetime (fleetlm ca init)
        description="lifetime of the node certificates Join and Renew sign (at most 10 years); a node renews its"
        " own at two thirds of it while it runs",
    )
    join_listen: str | None = Field(
        None,
        description="host:port of JoinService over server-side TLS with no client certificate (a joining node has"
        " none yet); needs the TLS files and --ca-dir",
    )
    insecure_plaintext: bool = Field(
        False, description="serve plaintext gRPC on a non-loopback --listen (refused without it unless TLS is on)"
    )
    metrics_listen: str = Field(
        "127.0.0.1:9400",
        description='host:port of the Prometheus metrics port (/metrics; port 0 picks a free one, logged); "" for'
        " none. Beyond loopback it speaks HTTPS with the TLS files, or needs --insecure-plaintext",
    )
    log_level: str = Field("INFO", description="log level")
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text, or one JSON object per line (json), on stderr"
    )

    def etcd_access(self) -> EtcdAccess:
        password = self.etcd_password.get_secret_value() if self.etcd_password else None
        if self.etcd_password_file is not None:
            password = self.etcd_password_file.read_text().strip()
        if bool(self.etcd_user) != bool(password):
            raise ValueError("--etcd-user and its password go together")
        return EtcdAccess(self.etcd_ca, self.etcd_cert, self.etcd_key, self.etcd_user, password)
