"""ClusterStore on etcd v3 through aetcd. Records are protobuf messages stored as JSON, so that
`etcdctl get --prefix /fleetlm` is readable by an operator."""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import aetcd
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane.store import KINDS, PREFIXES, Fence, FencedOut, Holder, StoreEvent, record_key


class EtcdStore:
    def __init__(self, url: str, prefix: str = "/fleetlm", timeout_seconds: int = 5) -> None:
        parsed = urlparse(url if "://" in url else f"http://{url}")
        self._client = aetcd.Client(
            host=parsed.hostname or "127.0.0.1", port=parsed.port or 2379, timeout=timeout_seconds
        )
        self._prefix = prefix.rstrip("/")

    def _dir(self, kind: str) -> str:
        return f"{self._prefix}/{PREFIXES[kind]}/"

    def _decode(self, kind: str, raw: bytes) -> Message:
        return json_format.Parse(raw, KINDS[kind](), ignore_unknown_fields=True)

    async def connect(self) -> None:
        await self._client.connect()
        await self._client.status()  # fail at start-up, not on the first request, if etcd is down

    async def close(self) -> None:
        await self._client.close()

    async def grant_lease(self, ttl_seconds: int) -> int:
        lease = await self._client.lease(ttl_seconds)
        return int(lease.id)

    async def refresh_lease(self, lease_id: int) -> bool:
        reply = await self._client.refresh_lease(lease_id)
        return reply is not None and reply.TTL > 0

    async def revoke_lease(self, lease_id: int) -> None:
        try:
            await self._client.revoke_lease(lease_id)
        except aetcd.exceptions.ClientError:
            pass  # already expired: the goal is reached

    async def put(self, kind: str, message: Message, lease_id: int = 0, fence: Fence | None = None) -> None:
        key = f"{self._dir(kind)}{record_key(kind, message)}".encode()
        value = json_format.MessageToJson(message, indent=None).encode()
        if fence is None:
            await self._client.put(key, value, lease=lease_id or None)
            return
        await self._fenced(fence, self._client.transactions.put(key, value, lease=lease_id or None))

    async def delete(self, kind: str, key: str, fence: Fence | None = None) -> bool:
        full = f"{self._dir(kind)}{key}".encode()
        if fence is None:
            result = await self._client.delete(full)
            return bool(result and result.deleted)
        responses = await self._fenced(fence, self._client.transactions.delete(full))
        return bool(responses[0].response_delete_range.deleted)

    async def _fenced(self, fence: Fence, operation: Any) -> list[Any]:
        """One transaction: the operation, only if the election key still has the fence's create revision
        (a vacated key has 0; a key won again by anyone has a newer one)."""
        tx = self._client.transactions
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
        found = await self._client.get(self.election_key(election).encode())
        return None if found is None else Holder(found.value.decode(), int(found.create_revision))

    async def watch_election(self, election: str) -> AsyncIterator[Holder | None]:
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
        found = await self._client.get(f"{self._dir(kind)}{key}".encode())
        return None if found is None else self._decode(kind, found.value)

    async def list(self, kind: str) -> list[Any]:
        found = await self._client.get_prefix(self._dir(kind).encode())
        return [self._decode(kind, kv.value) for kv in found]

    async def watch(self) -> AsyncIterator[StoreEvent]:
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
        await self._client.put(f"{self._prefix}/{key}".encode(), value)

    async def get_value(self, key: str) -> bytes | None:
        found = await self._client.get(f"{self._prefix}/{key}".encode())
        return None if found is None else bytes(found.value)

    async def list_values(self, directory: str) -> builtins.list[bytes]:
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
