"""ClusterStore on etcd v3 through aetcd. Records are protobuf messages stored as JSON, so that
`etcdctl get --prefix /fleetlm` is readable by an operator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlparse

import aetcd
from google.protobuf import json_format

from controlplane.store import StoreEvent
from fleetlm.controlplane.v1 import node_pb2


def _encode(message: node_pb2.Node | node_pb2.ModelSpec) -> bytes:
    return json_format.MessageToJson(message, indent=None).encode()


class EtcdStore:
    def __init__(self, url: str, prefix: str = "/fleetlm", timeout_seconds: int = 5) -> None:
        parsed = urlparse(url if "://" in url else f"http://{url}")
        self._client = aetcd.Client(
            host=parsed.hostname or "127.0.0.1", port=parsed.port or 2379, timeout=timeout_seconds
        )
        self._prefix = prefix.rstrip("/")
        self._nodes = f"{self._prefix}/nodes/"
        self._models = f"{self._prefix}/models/"

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

    async def put_node(self, node: node_pb2.Node, lease_id: int) -> None:
        await self._client.put(f"{self._nodes}{node.node_id}".encode(), _encode(node), lease=lease_id)

    async def get_node(self, node_id: str) -> node_pb2.Node | None:
        found = await self._client.get(f"{self._nodes}{node_id}".encode())
        if found is None:
            return None
        return json_format.Parse(found.value, node_pb2.Node(), ignore_unknown_fields=True)

    async def list_nodes(self) -> list[node_pb2.Node]:
        found = await self._client.get_prefix(self._nodes.encode())
        return [json_format.Parse(kv.value, node_pb2.Node(), ignore_unknown_fields=True) for kv in found]

    async def put_model(self, spec: node_pb2.ModelSpec) -> None:
        await self._client.put(f"{self._models}{spec.name}".encode(), _encode(spec))

    async def list_models(self) -> list[node_pb2.ModelSpec]:
        found = await self._client.get_prefix(self._models.encode())
        return [json_format.Parse(kv.value, node_pb2.ModelSpec(), ignore_unknown_fields=True) for kv in found]

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

    def _parse(self, event: aetcd.rtypes.Event) -> StoreEvent | None:
        key = event.kv.key.decode()
        deleted = event.kind == aetcd.rtypes.EventKind.DELETE
        if key.startswith(self._nodes):
            node_id = key.removeprefix(self._nodes)
            if deleted:
                return StoreEvent("node", node_id)
            node = json_format.Parse(event.kv.value, node_pb2.Node(), ignore_unknown_fields=True)
            return StoreEvent("node", node_id, node=node)
        if key.startswith(self._models):
            name = key.removeprefix(self._models)
            if deleted:
                return StoreEvent("model", name)
            spec = json_format.Parse(event.kv.value, node_pb2.ModelSpec(), ignore_unknown_fields=True)
            return StoreEvent("model", name, model=spec)
        return None
