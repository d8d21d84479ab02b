"""Options for the gRPC client channels the services open to one another (edge -> nodes and control
planes)."""

from __future__ import annotations

# gRPC backs off reconnecting to a peer that went away up to 120 s by default, failing calls at once
# meanwhile: a node or control plane that comes back would stay unreachable that long.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
