"""The edge's copy of the API-key table, kept current from the control plane's `AdminService.WatchApiKeys`.

A presented key is checked in memory: HMAC-SHA256(fleet secret, key), then a dict lookup by that hash. The
lookup leaks nothing useful through its timing: what is looked up is a keyed MAC the client cannot compute,
so no guess can be steered byte by byte. Revoked and expired keys stay in the table and are refused.

When the stream breaks, the edge keeps its last table (as it keeps its routing table) and reconnects to each
control plane in turn; a revocation made meanwhile reaches it when the stream is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Sequence

import grpc

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc
from mesh.errors import ErrorCode, FleetError
from mesh.lifecycle import cancelled_by_caller

log = logging.getLogger(__name__)

_INVALID = "Incorrect API key provided. Pass a valid key as 'Authorization: Bearer <key>'."


class KeyTable:
    def __init__(self, fleet_secret: bytes) -> None:
        self._secret = fleet_secret
        self._by_hash: dict[bytes, admin_pb2.ApiKey] = {}
        self.synced = asyncio.Event()

    def replace(self, update: admin_pb2.WatchApiKeysResponse) -> None:
        self._by_hash = {bytes(r.hash): r.key for r in update.keys}
        self.synced.set()

    def __len__(self) -> int:
        return len(self._by_hash)

    def check(self, presented: str | None, now: float | None = None) -> admin_pb2.ApiKey:
        """The key's record, or 401 invalid_api_key: none sent, unknown, revoked or expired (one answer for
        all, so a caller cannot tell a revoked key from a made-up one)."""
        if not presented:
            raise FleetError(
                ErrorCode.INVALID_API_KEY,
                "You didn't provide an API key. Pass it as 'Authorization: Bearer <key>'.",
            )
        digest = hmac.new(self._secret, presented.encode(errors="replace"), hashlib.sha256).digest()
        key = self._by_hash.get(digest)
        if key is None or key.revoked:
            raise FleetError(ErrorCode.INVALID_API_KEY, _INVALID)
        if key.HasField("expires_at") and key.expires_at.ToNanoseconds() <= (now or time.time()) * 1e9:
            raise FleetError(ErrorCode.INVALID_API_KEY, _INVALID)
        return key


class KeyFeed:
    """Follows WatchApiKeys from the first control plane that answers, moving on when it goes away."""

    def __init__(self, table: KeyTable, channels: Sequence[grpc.aio.Channel], edge_id: str, credential: str):
        self.table = table
        self._channels = list(channels)
        self._edge_id = edge_id
        self._metadata = (("authorization", f"Bearer {credential}"),)
        self.connected = False

    async def run(self) -> None:
        backoff = 0.1
        turn = 0
        while True:
            channel = self._channels[turn % len(self._channels)]
            turn += 1
            try:
                call = admin_pb2_grpc.AdminServiceStub(channel).WatchApiKeys(
                    admin_pb2.WatchApiKeysRequest(edge_id=self._edge_id), metadata=self._metadata
                )
                try:
                    async for update in call:
                        if not self.connected:
                            log.info("API-key table received: %d keys", len(update.keys))
                        self.connected = True
                        backoff = 0.1
                        self.table.replace(update)
                finally:
                    call.cancel()
            except asyncio.CancelledError:
                if cancelled_by_caller():
                    raise
                log.warning("API-key stream cancelled by its channel's close; checking keys on the last table")
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    # A refusal an operator must fix (the fleet secret, the edge's certificate): said each time.
                    log.error("the control plane refuses this edge the API-key table: %s", exc.details())
                elif self.connected or backoff <= 0.1:
                    log.warning("API-key stream lost (%s); checking keys on the last table", exc.code().name)
            finally:
                self.connected = False
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 5.0)
