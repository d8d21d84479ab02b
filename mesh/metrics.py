"""Prometheus metrics: the names, label rules and histogram buckets all three services share, and the
metrics port of the control plane and the node.

Names are `fleetlm_<component>_...`; buckets follow vLLM's and OpenTelemetry GenAI's (`gen_ai.server.
time_to_first_token`, `time_per_output_token`), with finer low buckets because a CPU replica of a small model
answers in milliseconds. Histograms are labelled by model (and node where it means something), never by API
key or user: their series count must stay bounded by the fleet's size, not by its clients.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from mesh.tls import TlsFiles

log = logging.getLogger(__name__)

PREFIX = "fleetlm"

# Seconds. Time to first token: OpenTelemetry GenAI's advice, from 1 ms to 10 s, then vLLM's long tail.
TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
# Time per output token (inter-token latency): OpenTelemetry GenAI's, with 1 ms and 5 ms below it.
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
# End-to-end request latency: vLLM's.
E2E_BUCKETS = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0,
)  # fmt: skip
# Tokens per request (prompt or completion): powers of 4 up to a long context.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)
# Short internal operations (a routing decision, an etcd call, a decode step): 100 us to 10 s.
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass
class MetricsServer:
    """The HTTP server of a metrics port (a thread of prometheus_client's); `close()` stops it."""

    server: Any
    thread: Any
    port: int

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(listen: str, tls: TlsFiles | None = None, registry: CollectorRegistry = REGISTRY) -> MetricsServer:
    """Serve `registry` at http(s)://listen/metrics (`host:0` picks a free port). With the component's TLS
    files the port speaks HTTPS with its fleet certificate; a client certificate is asked for but not
    required, so a Prometheus server given the fleet CA (tls_config.ca_file) can scrape it."""
    host, _, port = listen.rpartition(":")
    options: dict[str, Any] = {}
    if tls is not None:
        options = {"certfile": str(tls.cert), "keyfile": str(tls.key), "client_cafile": str(tls.ca)}
    server, thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry, **options)
    bound = server.server_address[1]
    log.info("metrics on %s://%s:%d/metrics", "https" if tls else "http", host or "0.0.0.0", bound)
    return MetricsServer(server, thread, bound)
