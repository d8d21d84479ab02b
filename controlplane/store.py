"""The cluster store: where the control plane keeps all fleet state. One protocol, one file per backend.

Records, by kind (etcd key under the prefix):
  node         nodes/{node_id}                 Node, bound to the node's lease: gone when it stops heartbeating
  model        models/{name}                   ModelSpec a node declared in its own catalog
  deployment   deployments/{name}              Deployment: desired state an operator asked for
  undeployed   undeployed/{name}               UndeployedDeployment: one an operator removed, which a
                                               deployments file's unchanged entry must not bring back
  assignment   assignments/{node_id}/{model}   Assignment: a replica the control plane placed on a node
  scheduling   scheduling/{node_id}            SchedulingRecord: cordoned or draining (survives restarts)

Beside the records, one key per election (`election/{name}`), created under the winner's lease; its create
revision is the winner's fencing token. A write made in the leader's role passes `fence=`: the store makes
it only while that same key still exists, in one transaction, so a leader that was paused past its lease
(and replaced) cannot write what it decided before the pause.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.message import Message

from fleetlm.controlplane.v1 import node_pb2
from mesh.errors import ErrorCode, FleetError

KINDS: dict[str, type[Message]] = {
    "node": node_pb2.Node,
    "model": node_pb2.ModelSpec,
    "deployment": node_pb2.Deployment,
    "undeployed": node_pb2.UndeployedDeployment,
    "assignment": node_pb2.Assignment,
    "scheduling": node_pb2.Node,  # only node_id and scheduling are set
}
PREFIXES = {
    "node": "nodes",
    "model": "models",
    "deployment": "deployments",
    "undeployed": "undeployed",
    "assignment": "assignments",
    "scheduling": "scheduling",
}


def assignment_key(node_id: str, model: str) -> str:
    """The key (under assignments/) of a node's assignment of `model`."""
    return f"{node_id}/{model}"


def assignment_node(key: str) -> str:
    """The node id of an assignment's key (node ids hold no '/'; model names may)."""
    return key.split("/", 1)[0]


def record_key(kind: str, message: Message) -> str:
    """The key (under the kind's prefix) a record is stored at."""
    if kind in ("node", "scheduling"):
        return str(message.node_id)  # type: ignore[attr-defined]
    if kind == "model":
        return str(message.name)  # type: ignore[attr-defined]
    if kind == "deployment":
        return str(message.spec.name)  # type: ignore[attr-defined]
    if kind == "undeployed":
        return str(message.deployment.spec.name)  # type: ignore[attr-defined]
    if kind == "assignment":
        return assignment_key(message.node_id, message.model.name)  # type: ignore[attr-defined]
    raise ValueError(kind)


@dataclass(frozen=True)
class Fence:
    """A leader's fencing token: the election key and the create revision it had when this leader won."""

    key: str
    revision: int


class FencedOut(Exception):
    """A fenced write was refused: the election key is no longer the one the writer created (its lease
    expired, someone else leads). Nothing was written."""


class LeaseNotFound(Exception):
    """A write under a lease that no longer exists (it expired or was revoked). Nothing was written."""


class StoreUnavailable(FleetError):
    """The store cannot be reached (its connection failed or timed out). A FleetError, BACKEND_UNAVAILABLE
    with a retry hint, so that an RPC that needed the store answers UNAVAILABLE saying so, wherever the call
    was made; a background loop that sees it knows the store is away, not that its own work failed."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BACKEND_UNAVAILABLE, message, retry_after_seconds=1)


@dataclass(frozen=True)
class Holder:
    """Who holds an election key: the value the winner wrote (its address) and the key's create revision."""

    value: str
    revision: int


@dataclass(frozen=True)
class StoreEvent:
    """A change to one record. `value` is None when the record was deleted."""

    kind: str
    key: str
    value: Message | None = None


class ClusterStore(Protocol):
    """Every call raises StoreUnavailable when the backend cannot be reached."""

    @property
    def reachable(self) -> bool:
        """False from a call that found the backend unreachable until one that reached it again."""
        ...

    async def grant_lease(self, ttl_seconds: int) -> int:
        """A new lease; records put under it vanish when it is not refreshed within the TTL."""
        ...

    async def refresh_lease(self, lease_id: int) -> bool:
        """Keep a lease alive. False when it has already expired."""
        ...

    async def revoke_lease(self, lease_id: int) -> None: ...

    async def put(self, kind: str, message: Message, lease_id: int = 0, fence: Fence | None = None) -> None:
        """Write a record; with a fence, only while the fence holds (else FencedOut, nothing written)."""
        ...

    async def delete(self, kind: str, key: str, fence: Fence | None = None) -> bool:
        """Remove a record; False if it did not exist. With a fence, as for put."""
        ...

    async def get(self, kind: str, key: str) -> Any: ...

    async def list(self, kind: str) -> list[Any]: ...

    async def watch(self) -> AsyncIterator[StoreEvent]:
        """Start watching every record; returns the changes from now on, in order. The iterator ends
        (or raises) if the backend drops the watch."""
        ...

    async def campaign(self, election: str, value: str, lease_id: int) -> Fence | None:
        """Create the election key under the lease if no one holds it: the fence if this call won, else None."""
        ...

    async def holder(self, election: str) -> Holder | None:
        """Who holds the election key now, or None when it is vacant."""
        ...

    async def watch_election(self, election: str) -> AsyncIterator[Holder | None]:
        """Start watching the election key: its holder after each change (None when vacated). The iterator
        ends (or raises) if the backend drops the watch."""
        ...

    async def close(self) -> None: ...
