"""API keys in etcd: create (the secret is returned once), list, revoke, and the key table every control plane
keeps in memory and streams to the edges.

A key's secret is `flk-` + base64url of 32 random bytes (`secrets`). etcd holds only HMAC-SHA256(fleet
secret, secret), under `<prefix>/api-keys/<id>`: a copy of etcd lets no one use a key, nor test guesses
without the fleet secret (an unsalted SHA-256, as LiteLLM keeps, would allow the second). The hash goes to
edges (they compute the same HMAC of a presented key and look it up); it never goes to an operator.

Writes are made by the leader, fenced by its election key like every other write. Every control plane
follows the table by reading the directory every second (a range read of a few records) and at once after a
write of its own, and pushes each change to its WatchApiKeys streams: a revocation reaches every edge within
about a second.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

from google.protobuf import json_format
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from controlplane.etcd_store import EtcdStore
from controlplane.store import Fence, FencedOut, StoreUnavailable
from fleetlm.controlplane.v1 import admin_pb2
from mesh import durations
from mesh.auth import read_secret_file
from mesh.errors import ErrorCode, FleetError, invalid, required

log = logging.getLogger(__name__)

SECRET_PREFIX = "flk-"
DIRECTORY = "api-keys"
FOLLOW_INTERVAL_SECONDS = 1.0
MAX_NAME = 128


class AuthSettings(BaseSettings):
    """The control plane's credentials (FLEETLM_CP_AUTH_SECRET_FILE, FLEETLM_CP_ADMIN_TOKEN_FILE). Interim
    home: they belong in ControlPlaneSettings, with the flags --auth-secret-file and --admin-token-file."""

    model_config = SettingsConfigDict(env_prefix="FLEETLM_CP_", extra="ignore")

    auth_secret_file: Path | None = Field(
        None, description="the fleet secret (>= 32 random bytes) API keys are hashed with; never logged"
    )
    admin_token_file: Path | None = Field(
        None, description="the admin token every AdminService RPC must carry as 'authorization: Bearer'"
    )


def key_hash(fleet_secret: bytes, secret: str) -> bytes:
    return hmac.new(fleet_secret, secret.encode(), hashlib.sha256).digest()


def new_secret() -> str:
    return SECRET_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def public(record: admin_pb2.ApiKeyRecord) -> admin_pb2.ApiKey:
    """What an operator may see of a key: everything but the hash."""
    out = admin_pb2.ApiKey()
    out.CopyFrom(record.key)
    return out


def _validate(request: admin_pb2.CreateApiKeyRequest) -> None:
    if not request.name.strip() or len(request.name) > MAX_NAME:
        raise invalid("name", f"a key needs a name of 1 to {MAX_NAME} characters")
    if any(not m.strip() for m in request.models):
        raise invalid("models", "a model name cannot be empty")
    if request.HasField("expires_at"):
        # Read as plain fields: Timestamp's own conversions raise on values outside years 1-9999.
        seconds, nanos = request.expires_at.seconds, request.expires_at.nanos
        if not 0 <= nanos < 1_000_000_000 or seconds > durations.LAST_TIMESTAMP_SECONDS:
            raise invalid("expires_at", "expires_at must be a valid time before the year 10000")
        if seconds <= time.time():
            raise invalid("expires_at", "expires_at must be in the future")


class ApiKeys:
    """The key table of one control plane: etcd's, followed; writes made in the leader's role."""

    def __init__(self, store: EtcdStore, fleet_secret: bytes | None) -> None:
        self._store = store
        self._secret = fleet_secret
        self.records: dict[str, admin_pb2.ApiKeyRecord] = {}
        self._version = 0
        self._changed = asyncio.Condition()

    @classmethod
    def from_settings(cls, store: EtcdStore, settings: AuthSettings) -> ApiKeys:
        secret = read_secret_file(settings.auth_secret_file, "auth secret") if settings.auth_secret_file else None
        return cls(store, secret)

    def _need_secret(self) -> bytes:
        if self._secret is None:
            raise FleetError(
                ErrorCode.NOT_CONFIGURED,
                "API keys need the fleet secret: start the control plane with --auth-secret-file",
            )
        return self._secret

    async def load(self) -> None:
        """Read the table from etcd; wake the watchers when it changed."""
        found: dict[str, admin_pb2.ApiKeyRecord] = {}
        for raw in await self._store.list_values(DIRECTORY):
            record = json_format.Parse(raw, admin_pb2.ApiKeyRecord(), ignore_unknown_fields=True)
            found[record.key.id] = record
        if found != self.records:
            self.records = found
            async with self._changed:
                self._version += 1
                self._changed.notify_all()

    async def follow(self) -> None:
        while True:
            try:
                await self.load()
            except StoreUnavailable:
                pass  # etcd away (said once by the store): keep the table we have, try again
            except Exception as exc:
                log.warning("cannot read the API keys from etcd (%s); keeping the last table", type(exc).__name__)
            await asyncio.sleep(FOLLOW_INTERVAL_SECONDS)

    async def snapshots(self) -> AsyncIterator[admin_pb2.WatchApiKeysResponse]:
        """The whole table now, then again after each change."""
        seen = -1
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda seen=seen: self._version != seen)  # type: ignore[misc]
                seen = self._version
            yield admin_pb2.WatchApiKeysResponse(keys=[self.records[i] for i in sorted(self.records)])

    async def _put(self, record: admin_pb2.ApiKeyRecord, fence: Fence | None) -> None:
        key = f"{DIRECTORY}/{record.key.id}"
        value = json_format.MessageToJson(record, indent=None).encode()
        if fence is None:
            await self._store.put_value(key, value)
        else:
            # Interim: EtcdStore has no fenced put of a plain value yet; this is the same transaction its put
            # makes for records (compare the election key's create revision).
            client = self._store._client
            full = f"{self._store._prefix}/{key}".encode()
            await self._store._fenced(fence, client.transactions.put(full, value))
        await self.load()

    async def create(self, request: admin_pb2.CreateApiKeyRequest, fence: Fence | None) -> tuple[admin_pb2.ApiKey, str]:
        _validate(request)
        fleet_secret = self._need_secret()
        secret = new_secret()
        record = admin_pb2.ApiKeyRecord(hash=key_hash(fleet_secret, secret))
        key = record.key
        key.id = secrets.token_hex(6)
        key.name = request.name.strip()
        key.models.extend(sorted({m.strip() for m in request.models}))
        if request.HasField("expires_at"):
            key.expires_at.CopyFrom(request.expires_at)
        key.limits.CopyFrom(request.limits)
        key.prefix = secret[: len(SECRET_PREFIX) + 4]
        key.created_at.GetCurrentTime()
        await self._put(record, fence)
        log.info("API key %s (%s) created", key.id, key.name)  # never the secret
        return public(record), secret

    async def revoke(self, key_id: str, fence: Fence | None) -> admin_pb2.ApiKey:
        required(key_id, "id")
        raw = await self._store.get_value(f"{DIRECTORY}/{key_id}")
        if raw is None:
            raise FleetError(ErrorCode.API_KEY_NOT_FOUND, f"no API key has id '{key_id}'", param="id")
        record = json_format.Parse(raw, admin_pb2.ApiKeyRecord(), ignore_unknown_fields=True)
        record.key.revoked = True
        await self._put(record, fence)
        log.info("API key %s (%s) revoked", key_id, record.key.name)
        return public(record)

    def listed(self) -> admin_pb2.ListApiKeysResponse:
        ordered = sorted(self.records.values(), key=lambda r: (r.key.created_at.ToNanoseconds(), r.key.id))
        return admin_pb2.ListApiKeysResponse(keys=[public(r) for r in ordered])


__all__ = ["ApiKeys", "AuthSettings", "FencedOut", "key_hash", "new_secret", "public"]
