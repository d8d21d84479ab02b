"""The cluster store: where the control plane keeps all fleet state. One protocol, one file per backend.

State is two kinds of record:
  {prefix}/nodes/{node_id}  -> Node, bound to the node's lease: it vanishes when the node stops heartbeating
  {prefix}/models/{name}    -> ModelSpec, durable: a model stays known while no node serves it
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from fleetlm.controlplane.v1 import node_pb2


@dataclass(frozen=True)
class StoreEvent:
    """A change to one record. `node`/`model` is None when the record was deleted."""

    kind: str  # "node" or "model"
    key: str  # node id or model name
    node: node_pb2.Node | None = None
    model: node_pb2.ModelSpec | None = None


class ClusterStore(Protocol):
    async def grant_lease(self, ttl_seconds: int) -> int:
        """A new lease; records put under it vanish when it is not refreshed within the TTL."""
        ...

    async def refresh_lease(self, lease_id: int) -> bool:
        """Keep a lease alive. False when it has already expired."""
        ...

    async def revoke_lease(self, lease_id: int) -> None: ...

    async def put_node(self, node: node_pb2.Node, lease_id: int) -> None: ...

    async def get_node(self, node_id: str) -> node_pb2.Node | None: ...

    async def list_nodes(self) -> list[node_pb2.Node]: ...

    async def put_model(self, spec: node_pb2.ModelSpec) -> None: ...

    async def list_models(self) -> list[node_pb2.ModelSpec]: ...

    async def watch(self) -> AsyncIterator[StoreEvent]:
        """Start watching every record; returns the changes from now on, in order. The iterator ends
        (or raises) if the backend drops the watch."""
        ...

    async def close(self) -> None: ...
