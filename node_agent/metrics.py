"""The node agent's Prometheus metrics, served on its metrics port (`--metrics-listen`, mesh.metrics.serve).

Two kinds. Counters of requests and tokens are counted as requests end, from the record the node's
InferenceService logs (`served`, given to NodeInference; node_agent.request_log): requests_total{model,method,
outcome} (method: Generate, Embed, Tokenize, Detokenize; outcome: ok, cancelled, or the fleet error code the
request failed with: NO_CAPACITY when the replica was full, MODEL_UNAVAILABLE, ...), prompt_tokens_total and
generation_tokens_total{model} (the usage the node reported; for a request that ended before its result, a
cancelled one, what the engine had spent on it: its prompt once computed, the tokens generated); of MultiplexService
(`count_multiplex`): multiplex_streams (open, one per edge) and multiplexed_calls_total. Everything about the
replicas is read from the host when Prometheus scrapes (`_ReplicaCollector`), so it costs the hot path
nothing and a replica that is unloaded leaves no stale series:
  replica_state{model,state}        1 for the replica's state (pending, loading, ready, failed, unloading)
  requests_running / requests_waiting{model}, slots{model} (sequences run at once), capacity{model}
  requests_rejected_total{model}    refused because the replica was full
  load_seconds{model}               how long its last successful load took; load_attempts_total
  llama.cpp replicas: kv_cache_usage_ratio, prefix_cache_queries_total / prefix_cache_hits_total (prompt
  tokens, and those whose KV was reused), decode_steps_total, decode_step_seconds and
  decode_batch_sequences (histograms), engine_generated_tokens_total; embedding_batches_total,
  embedding_cache_hits_total, embedding_cache_misses_total
  engine servers (SGLang, an attached or launched OpenAI-compatible server): engine_server_info{model,
  engine,metrics_url}: their own metrics are linked, not re-exported, so that a scrape of the node never
  waits on a server (Prometheus scrapes the URL itself; SGLang serves it with --enable-metrics)
  GPUs (NVML, when present; no GPU, no series): gpu_memory_used_bytes, gpu_memory_total_bytes,
  gpu_utilization_ratio{gpu,uuid}
Labels are the model (a node hosts one replica of a model) and, for GPUs, the index and UUID.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetlm.controlplane.v1 import node_pb2
from mesh.catalog import queue_limit, running_limit
from mesh.errors import ErrorCode
from mesh.metrics import PREFIX, Distribution, new_registry

if TYPE_CHECKING:
    from node_agent.host import HostedModel, ModelHost
    from node_agent.request_log import Served

log = logging.getLogger(__name__)
P = f"{PREFIX}_node_"


def _state(hosted: HostedModel) -> str:
    if hosted.unloading:
        return "unloading"
    return node_pb2.ReplicaState.Name(hosted.state).removeprefix("REPLICA_STATE_").lower()  # type: ignore[arg-type]


def _histogram(name: str, doc: str, model: str, distribution: Distribution) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["model"])
    counts, cumulative, buckets = list(distribution.counts), 0, []
    for bound, count in zip([*map(str, distribution.buckets), "+Inf"], counts, strict=True):
        cumulative += count
        buckets.append((bound, float(cumulative)))
    family.add_metric([model], buckets, distribution.total)
    return family


def metrics_url(engine: Any) -> str:
    """The /metrics URL of an engine's server (an attached or launched OpenAI-compatible server, SGLang), with
    any credentials in the URL left out; "" for an in-process engine."""
    client = getattr(engine, "client", engine)
    base = getattr(getattr(client, "config", None), "base_url", None)
    if not isinstance(base, str) or not base:
        return ""
    parts = urlsplit(base)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    path = parts.path.rstrip("/").removesuffix("/v1")
    return urlunsplit((parts.scheme, netloc, f"{path}/metrics", "", ""))


class _ReplicaCollector(Collector):
    """Every replica's state and its engine's figures, read from the host when scraped (on the metrics
    port's thread: it only reads, and copies what it iterates over)."""

    def __init__(self, host: ModelHost) -> None:
        self._host = host

    def collect(self) -> Iterable[Metric]:
        state = GaugeMetricFamily(P + "replica_state", "1 for the replica's current state", labels=["model", "state"])
        running = GaugeMetricFamily(P + "requests_running", "requests the engine runs now", labels=["model"])
        waiting = GaugeMetricFamily(P + "requests_waiting", "admitted requests waiting for a slot", labels=["model"])
        slots = GaugeMetricFamily(P + "slots", "requests the replica runs at once", labels=["model"])
        capacity = GaugeMetricFamily(P + "capacity", "running + waiting requests before it refuses", labels=["model"])
        rejected = CounterMetricFamily(P + "requests_rejected", "requests refused: replica full", labels=["model"])
        load_seconds = GaugeMetricFamily(P + "load_seconds", "duration of the last successful load", labels=["model"])
        attempts = CounterMetricFamily(P + "load_attempts", "times the replica was loaded", labels=["model"])
        server = GaugeMetricFamily(
            P + "engine_server_info",
            "an engine server's own Prometheus metrics URL (linked, not re-exported)",
            labels=["model", "engine", "metrics_url"],
        )
        engines: list[Metric] = []
        for hosted in list(self._host.models.values()):
            model = hosted.name
            state.add_metric([model, _state(hosted)], 1)
            run, wait = hosted.load()
            running.add_metric([model], run)
            waiting.add_metric([model], wait)
            slots.add_metric([model], running_limit(hosted.spec))
            capacity.add_metric([model], running_limit(hosted.spec) + queue_limit(hosted.spec))
            rejected.add_metric([model], hosted.rejected)
            attempts.add_metric([model], hosted.load_attempts)
            if hosted.load_seconds:
                load_seconds.add_metric([model], hosted.load_seconds)
            engine = hosted.engine
            if engine is None:
                continue
            url = metrics_url(engine)
            if url:
                server.add_metric([model, hosted.spec.engine or "openai", url], 1)
            engines.extend(_llama_cpp(model, engine))
        yield from (state, running, waiting, slots, capacity, rejected, load_seconds, attempts, server, *engines)


def _llama_cpp(model: str, engine: Any) -> Iterable[Metric]:
    """A llama.cpp replica's batching, KV cache and embedding figures (nothing for other engines)."""
    stats = getattr(engine, "stats", None)
    loop = getattr(engine, "_loop", None)
    if stats is not None and loop is not None:
        kv = GaugeMetricFamily(P + "kv_cache_usage_ratio", "share of the KV cache's cells in use", labels=["model"])
        kv.add_metric([model], loop.kv_tokens() / max(1, engine.config.context_size * engine.config.slots))
        yield kv
        for name, doc, number in (
            ("prefix_cache_queries", "prompt tokens looked up in the prefix cache", stats.prompt_tokens),
            ("prefix_cache_hits", "prompt tokens whose KV the prefix cache held", stats.reused_prompt_tokens),
            ("decode_steps", "llama_decode steps", stats.steps),
            ("engine_generated_tokens", "tokens the engine generated", stats.generated_tokens),
        ):
            family = CounterMetricFamily(P + name, doc, labels=["model"])
            family.add_metric([model], number)
            yield family
        yield _histogram(P + "decode_step_seconds", "one decode step: batch, llama_decode, sampling", model,
                         stats.step_seconds)  # fmt: skip
        yield _histogram(P + "decode_batch_sequences", "sequences in one decode step", model, stats.step_sequences)
    embedder = getattr(engine, "embedder", None)
    if embedder is not None:
        for name, doc, number in (
            ("embedding_batches", "embedding calls made (inputs of concurrent requests batched)", embedder.batches),
            ("embedding_cache_hits", "embedding inputs answered from the cache", embedder.cache_hits),
            ("embedding_cache_misses", "embedding inputs that had to be embedded", embedder.cache_misses),
        ):
            family = CounterMetricFamily(P + name, doc, labels=["model"])
            family.add_metric([model], number)
            yield family


class _GpuCollector(Collector):
    """GPU memory and utilisation through NVML at each scrape; no GPU (or no driver): no series, no error."""

    def collect(self) -> Iterable[Metric]:
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
        except Exception:
            return
        try:
            used = GaugeMetricFamily(P + "gpu_memory_used_bytes", "GPU memory in use", labels=["gpu", "uuid"])
            total = GaugeMetricFamily(P + "gpu_memory_total_bytes", "GPU memory", labels=["gpu", "uuid"])
            busy = GaugeMetricFamily(
                P + "gpu_utilization_ratio", "share of the last sample period the GPU was busy", labels=["gpu", "uuid"]
            )
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric([str(index), uuid], memory.used)
                total.add_metric([str(index), uuid], memory.total)
                busy.add_metric([str(index), uuid], pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
        except Exception as exc:
            log.warning("NVML query for metrics failed: %s", exc)
            return
        finally:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
        yield from (used, total, busy)


class _MultiplexCollector(Collector):
    def __init__(self, multiplex: Any) -> None:
        self._multiplex = multiplex

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            P + "multiplex_streams", "MultiplexService streams open (one per edge)", value=self._multiplex.streams
        )
        yield CounterMetricFamily(
            P + "multiplexed_calls",
            "Generate calls that came over a MultiplexService stream (counted in requests_total too)",
            value=self._multiplex.calls,
        )


class NodeMetrics:
    def __init__(self, host: ModelHost, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or new_registry()
        self._host = host
        self.requests = Counter(
            P + "requests",
            "requests served by the node, by method (Generate, Embed, Tokenize, Detokenize) and outcome: ok,"
            " cancelled or the fleet error code",
            ["model", "method", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            P + "prompt_tokens", "prompt tokens of requests (a cancelled one's once computed)", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            P + "generation_tokens", "tokens generated for requests (a cancelled one's too)", ["model"], registry=r
        )
        r.register(_ReplicaCollector(host))
        r.register(_GpuCollector())

    def served(self, record: Served) -> None:
        """A request has ended (NodeInference gives every request's record, as it logs it)."""
        outcome = _OUTCOMES.get(record.outcome, record.outcome)
        # The model label comes from the request: only names this node hosts are kept, so a caller cannot
        # grow the series by inventing names.
        model = record.model if record.model in self._host.models else ""
        self.requests.labels(model, record.method, outcome).inc()
        if record.prompt_tokens:
            self.prompt_tokens.labels(model).inc(record.prompt_tokens)
        if record.completion_tokens:
            self.generation_tokens.labels(model).inc(record.completion_tokens)

    def count_multiplex(self, multiplex: Any) -> None:
        """Series of the node's MultiplexService (node_agent.multiplex_service), read when Prometheus scrapes."""
        self.registry.register(_MultiplexCollector(multiplex))


# The request log's outcomes as this counter has always labelled them.
_OUTCOMES = {"ok": "ok", str(ErrorCode.CANCELLED): "cancelled"}
