"""ClusterStore on etcd v3 through aetcd. Records are protobuf messages stored as JSON, so that
`etcdctl get --prefix /fleetlm` is readable by an operator.

Every call goes through `_call`: timed and counted (controlplane.metrics), and an etcd that cannot be reached
(aetcd's connection errors) raised as StoreUnavailable, so that whatever RPC needed etcd answers UNAVAILABLE
saying so instead of INTERNAL with a traceback. The outage is logged here once, as a warning, and its end
once; not once per call that meets it."""

from __future__ import annotations

import builtins
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aetcd
import aetcd.rpc
import aetcd.watcher
import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane.metrics import etcd_call
from controlplane.store import (
    KINDS,
    PREFIXES,
    Fence,
    FencedOut,
    Holder,
    LeaseNotFound,
    StoreEvent,
    StoreUnavailable,
    record_key,
)

log = logging.getLogger(__name__)

# What aetcd raises when etcd cannot be reached: UNAVAILABLE (ConnectionFailedError), DEADLINE_EXCEEDED (a
# frozen or overloaded etcd: ConnectionTimeoutError), a watch that could not be created in time, and a
# connection that another call was still making when this one gave up waiting for it (TimeoutError).
_LOST = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.WatchTimeoutError,
    TimeoutError,
)


@dataclass(frozen=True)
class EtcdAccess:
    """How to reach etcd beyond its URL: TLS (the CA that signed etcd's certificate, and a client certificate
    when etcd asks for one, --client-cert-auth) and etcd's own user/password authentication."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr, a log or an error

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.ca is None:
            if self.cert or self.key:
                raise ValueError("--etcd-cert/--etcd-key need --etcd-ca")
            return None
        if bool(self.cert) != bool(self.key):
            raise ValueError("--etcd-cert and --etcd-key go together")
        return grpc.ssl_channel_credentials(
            self.ca.read_bytes(),
            self.key.read_bytes() if self.key else None,
            self.cert.read_bytes() if self.cert else None,
        )


# The channel to etcd. A partition sends no RST: without pings the control plane's connection stalls, and
# once etcd is reachable again TCP's retransmission backoff kept it stalled for another 8-14 s after a 40 s
# partition (heartbeats failing, the lapsed nodes' grace running out). Pinged, a stalled connection is
# closed within 15 s and a new one is tried at least every 2 s (grpc's default backs off to 120 s). Every 10 s:
# etcd answers pings more often than its --grpc-keepalive-min-time (5 s) with GOAWAY, and counts pings on a
# connection without calls against it, so none are sent then (a control plane always has its watch open).
ETCD_CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.initial_reconnect_backoff_ms": 500,
    "grpc.min_reconnect_backoff_ms": 500,
    "grpc.max_reconnect_backoff_ms": 2_000,
}


class _TlsClient(aetcd.Client):
    """aetcd's client over TLS. aetcd 1.0 opens only plaintext channels; this is its `connect` with a secure
    channel, everything else (authentication, stubs, watcher) as aetcd does it."""

    def __init__(self, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target = f"{self._host}:{self._port}"
        self.channel = grpc.aio.secure_channel(target, self._credentials, options=list(self._options.items()))
        try:
            if self._username is not None and self._password is not None:
                self.auth_stub = aetcd.rpc.AuthStub(self.channel)
                reply = await self.auth_stub.Authenticate(
                    aetcd.rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout
                )
                self.metadata = (("token", reply.token),)
        except grpc.aio.AioRpcError as exc:
            raise aetcd.exceptions.ClientError(f"etcd authentication failed: {exc.code().name}") from None
        self.kvstub = aetcd.rpc.KVStub(self.channel)
        self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
        self.leasestub = aetcd.rpc.LeaseStub(self.channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


class EtcdStore:
    def __init__(
        self, url: str, prefix: str = "/fleetlm", timeout_seconds: int = 5, access: EtcdAccess | None = None
    ) -> None:
        parsed = urlparse(url if "://" in url else f"http://{url}")
        access = access or EtcdAccess()
        if parsed.scheme == "https" and access.ca is None:
            raise ValueError("an https:// etcd needs --etcd-ca")
        options: dict[str, Any] = {
            "host": parsed.hostname or "127.0.0.1",
            "port": parsed.port or 2379,
            "timeout": timeout_seconds,
            "username": access.user,
            "password": access.password,
            "options": ETCD_CHANNEL_OPTIONS,
        }
        credentials = access.credentials()
        self._client = aetcd.Client(**options) if credentials is None else _TlsClient(credentials, **options)
        self._prefix = prefix.rstrip("/")
        self.url = url
        self._unreachable_since: float | None = None  # time.monotonic() of the first failure of an outage

    @contextlib.contextmanager
    def _call(self, op: str) -> Iterator[None]:
        """One etcd call: timed and counted by `op`; a lost connection raised as StoreUnavailable."""
        with etcd_call(op):
            try:
                yield
            except _LOST as exc:
                raise self._unreachable(exc) from None
        if self._unreachable_since is not None:
            log.info("etcd at %s answers again (after %.1fs)", self.url, time.monotonic() - self._unreachable_since)
            self._unreachable_since = None

    @property
    def reachable(self) -> bool:
        return self._unreachable_since is None

    def _unreachable(self, exc: BaseException) -> StoreUnavailable:
        why = str(exc) or type(exc).__name__
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
            log.warning(
                "etcd at %s is unreachable (%s); what needs it answers UNAVAILABLE until it is back", self.url, why
            )
        return StoreUnavailable(f"etcd at {self.url} is unreachable ({why}); try again shortly")

    def _dir(self, kind: str) -> str:
        return f"{self._prefix}/{PREFIXES[kind]}/"

    def _decode(self, kind: str, raw: bytes) -> Message:
        return json_format.Parse(raw, KINDS[kind](), ignore_unknown_fields=True)

    async def connect(self) -> None:
        await self._client.connect()
        await self._client.status()  # fail at start-up, not on the first request, if etcd is down

    async def connect_for(self, command: str) -> None:
        """connect, or end `fleetlm <command>` with one line naming this etcd (down, a name that does not
        resolve, refused credentials, a TLS mismatch), not a traceback."""
        try:
            await self.connect()
        except aetcd.exceptions.ClientError as exc:
            raise SystemExit(f"fleetlm {command}: cannot use etcd at {self.url}: {exc}") from None

    async def close(self) -> None:
        await self._client.close()

    async def grant_lease(self, ttl_seconds: int) -> int:
        with self._call("lease_grant"):
            lease = await self._client.lease(ttl_seconds)
        return int(lease.id)

    async def refresh_lease(self, lease_id: int) -> bool:
        with self._call("lease_refresh"):
            reply = await self._client.refresh_lease(lease_id)
        return reply is not None and reply.TTL > 0

    async def revoke_lease(self, lease_id: int) -> None:
        try:
            with self._call("lease_revoke"):
                await self._client.revoke_lease(lease_id)
        except aetcd.exceptions.ClientError:
            pass  # already expired: the goal is reached (an etcd that cannot be reached is StoreUnavailable)

    async def put(self, kind: str, message: Message, lease_id: int = 0, fence: Fence | None = None) -> None:
        key = f"{self._dir(kind)}{record_key(kind, message)}".encode()
        value = json_format.MessageToJson(message, indent=None).encode()
        if fence is None:
            try:
                with self._call("put"):
                    await self._client.put(key, value, lease=lease_id or None)
            except aetcd.exceptions.ClientError as exc:
                if lease_id and "lease not found" in str(exc):
                    raise LeaseNotFound(f"lease {lease_id:x} not found") from None
                raise
            return
        await self._fenced(fence, self._client.transactions.put(key, value, lease=lease_id or None))

    async def delete(self, kind: str, key: str, fence: Fence | None = None) -> bool:
        full = f"{self._dir(kind)}{key}".encode()
        if fence is None:
            with self._call("delete"):
                result = await self._client.delete(full)
            return bool(result and result.deleted)
        responses = await self._fenced(fence, self._client.transactions.delete(full))
        return bool(responses[0].response_delete_range.deleted)

    async def _fenced(self, fence: Fence, operation: Any) -> list[Any]:
        """One transaction: the operation, only if the election key still has the fence's create revision
        (a vacated key has 0; a key won again by anyone has a newer one)."""
        tx = self._client.transactions
        with self._call("txn"):
            succeeded, responses = await self._client.transaction(
                compare=[tx.create(fence.key.encode()) == fence.revision], success=[operation], failure=[]
            )
        if not succeeded:
            raise FencedOut(f"the leadership fenced by {fence.key}@{fence.revision} is over")
        return list(responses)

    # --- elections --------------------------------------------------------------------------------------

    def election_key(self, election: str) -> str:
        return f"{self._prefix}/election/{election}"

    async def campaign(self, election: str, value: str, lease_id: int) -> Fence | None:
        key = self.election_key(election)
        tx = self._client.transactions
        with self._call("campaign"):
            succeeded, responses = await self._client.transaction(
                compare=[tx.create(key.encode()) == 0],  # vacant
                success=[tx.put(key.encode(), value.encode(), lease=lease_id), tx.get(key.encode())],
                failure=[],
            )
        if not succeeded:
            return None
        _, kv = responses[-1][0]  # the get, in the same transaction: the key this call created
        return Fence(key, int(kv.create_revision))

    async def holder(self, election: str) -> Holder | None:
        with self._call("get"):
            found = await self._client.get(self.election_key(election).encode())
        return None if found is None else Holder(found.value.decode(), int(found.create_revision))

    async def watch_election(self, election: str) -> AsyncIterator[Holder | None]:
        with self._call("watch"):
            watch = await self._client.watch(self.election_key(election).encode())

        async def events() -> AsyncIterator[Holder | None]:
            try:
                async for event in watch:
                    if event.kind == aetcd.rtypes.EventKind.DELETE:
                        yield None
                    else:
                        yield Holder(event.kv.value.decode(), int(event.kv.create_revision))
            finally:
                await watch.cancel()

        return events()

    async def get(self, kind: str, key: str) -> Any:
        with self._call("get"):
            found = await self._client.get(f"{self._dir(kind)}{key}".encode())
        return None if found is None else self._decode(kind, found.value)

    async def list(self, kind: str) -> list[Any]:
        with self._call("list"):
            found = await self._client.get_prefix(self._dir(kind).encode())
        return [self._decode(kind, kv.value) for kv in found]

    async def watch(self) -> AsyncIterator[StoreEvent]:
        with self._call("watch"):
            watch = await self._client.watch_prefix(f"{self._prefix}/".encode())

        async def events() -> AsyncIterator[StoreEvent]:
            try:
                async for event in watch:
                    parsed = self._parse(event)
                    if parsed is not None:
                        yield parsed
            finally:
                await watch.cancel()

        return events()

    # --- plain values outside the record kinds (join tokens, node identities) ------------------------------

    async def put_value(self, key: str, value: bytes) -> None:
        with self._call("put"):
            await self._client.put(f"{self._prefix}/{key}".encode(), value)

    async def get_value(self, key: str) -> bytes | None:
        with self._call("get"):
            found = await self._client.get(f"{self._prefix}/{key}".encode())
        return None if found is None else bytes(found.value)

    async def list_values(self, directory: str) -> builtins.list[bytes]:
        with self._call("list"):
            found = await self._client.get_prefix(f"{self._prefix}/{directory.rstrip('/')}/".encode())
        return [bytes(kv.value) for kv in found]

    def _parse(self, event: Any) -> StoreEvent | None:
        key = event.kv.key.decode()
        for kind in KINDS:
            directory = self._dir(kind)
            if key.startswith(directory):
                name = key.removeprefix(directory)
                if event.kind == aetcd.rtypes.EventKind.DELETE:
                    return StoreEvent(kind, name)
                return StoreEvent(kind, name, self._decode(kind, event.kv.value))
        return None
