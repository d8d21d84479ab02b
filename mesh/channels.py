"""Options for the gRPC client channels the services open to one another (edge -> nodes and control
planes), and the keepalive policy their servers must accept (`SERVER_KEEPALIVE_OPTIONS`)."""

from __future__ import annotations

# How often a channel pings its peer when nothing arrives, and how long it waits for the answer. A peer
# cut off by the network (a partition, a host that froze) sends no RST: without pings a stream to it
# stalls until the TCP retransmission timeout (15 minutes on Linux) or the request's own timeout (600 s).
# With them, a stalled connection is closed within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS and every call
# on it fails UNAVAILABLE: an attempt that had not started moves to another replica, a stream already
# going ends with an explicit error, and the node's circuit breaker opens.
KEEPALIVE_TIME_MS = 5_000
KEEPALIVE_TIMEOUT_MS = 5_000

# The largest message a fleetlm server or channel sends or takes. gRPC's default is 4 MiB to receive, which
# one Embed reply of 2,048 inputs (the most a request may hold) passes with a model of 576 dimensions.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # gRPC backs off reconnecting to a peer that went away up to 120 s by default, failing calls at once
    # meanwhile: a node or control plane that comes back would stay unreachable that long.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # Also ping an idle connection: the edge's channel to a node is often idle between requests, and
    # the next request should not be the one that finds it dead.
    ("grpc.keepalive_permit_without_calls", 1),
    # No cap on pings while no data flows (the default, 2, stops pinging a quiet connection).
    ("grpc.http2.max_pings_without_data", 0),
]

# What every fleetlm server accepts from those channels. A gRPC server answers pings that come more often
# than it allows (5 minutes by default without calls) with GOAWAY "too_many_pings", which would cut the
# channel at every keepalive; it allows a ping every KEEPALIVE_TIME_MS, less a margin for timer jitter.
SERVER_KEEPALIVE_OPTIONS = [
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.keepalive_permit_without_calls", 1),
]
