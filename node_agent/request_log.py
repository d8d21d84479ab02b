"""One request as the node serves it: its id bound (every log line about it carries the id), its span
when tracing is on (a child of the edge's, from the call's `traceparent` metadata), and ONE log line when
it ends: model, replica, outcome, tokens, duration; and the same record to the node's metrics
(node_agent.metrics), so that the log and the counters cannot disagree.

The id is the edge's `x-request-id` metadata, else the request's own `request_id` field (Generate), else
a fresh one (a caller that is not an edge)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from mesh import request_context, tracing
from mesh.errors import ErrorCode, FleetError

log = logging.getLogger("fleetlm.node.requests")
_REPLICA_FAILURES = (str(ErrorCode.INTERNAL), str(ErrorCode.BACKEND_UNAVAILABLE))


@dataclass
class Served:
    request_id: str
    method: str
    model: str
    operation: str
    engine: str = ""
    device: str = ""
    outcome: str = "ok"
    message: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    span: tracing.ServerSpan | None = None  # with tracing on

    def replica(self, engine: str, device: str) -> None:
        self.engine, self.device = engine, device

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens


def _request_id(metadata: Iterable[tuple[str, str | bytes]], field_id: str) -> str:
    sent = request_context.from_metadata(metadata)
    if sent:
        return sent
    return field_id if field_id and request_context.is_valid(field_id) else request_context.make()


@contextlib.contextmanager
def served(
    method: str, model: str, operation: str, metadata: Iterable[tuple[str, str | bytes]] | None, node_id: str,
    field_id: str = "", counted: Callable[[Served], None] | None = None,
) -> Iterator[Served]:  # fmt: skip
    """The record of one request, current inside the block; logged (and given to `counted`) when it ends."""
    pairs = tuple(metadata or ())
    record = Served(_request_id(pairs, field_id), method, model, operation)
    with request_context.bound(record.request_id):
        try:
            if tracing.TRACER is not None:
                attributes = {
                    "fleetlm.request_id": record.request_id,
                    "fleetlm.node.id": node_id,
                    "gen_ai.operation.name": operation,
                    "gen_ai.request.model": model,
                }
                # Named for the model once a replica of it takes the request (`_finish`): a name a caller
                # invents must not become a span name (it stays in gen_ai.request.model).
                record.span = tracing.ServerSpan(operation, tracing.carrier_from(pairs), attributes)
            if record.span is None:
                yield record
            else:
                with tracing.current(record.span):
                    yield record
        except FleetError as error:
            record.outcome, record.message = str(error.code), error.message
            raise
        except (asyncio.CancelledError, GeneratorExit):
            record.outcome = str(ErrorCode.CANCELLED)  # the edge cancelled the call (its client went away)
            raise
        except Exception as exc:
            record.outcome, record.message = str(ErrorCode.INTERNAL), repr(exc)
            raise
        finally:
            _finish(record, node_id)
            if counted is not None:
                counted(record)


def _finish(record: Served, node_id: str) -> None:
    duration = round((time.perf_counter() - record.started) * 1000, 2)
    replica = f"{node_id}/{record.model}"
    fields = {
        "method": record.method,
        "model": record.model,
        "replica": replica,
        "engine": record.engine,
        "device": record.device,
        "outcome": record.outcome,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "duration_ms": duration,
    }
    failed = record.outcome not in ("ok", str(ErrorCode.CANCELLED))
    # A failure of the replica (not of the request) is a warning; a refusal or a bad request, info.
    level = logging.WARNING if record.outcome in _REPLICA_FAILURES else logging.INFO
    log.log(
        level,
        "%s %s on %s (%s %s): %s prompt_tokens=%d completion_tokens=%d duration_ms=%.2f%s",
        record.method,
        record.model,
        replica,
        record.engine or "-",
        record.device or "-",
        record.outcome,
        record.prompt_tokens,
        record.completion_tokens,
        duration,
        f": {record.message}" if record.message else "",
        extra=fields,
    )
    if record.span is not None:
        record.span.attributes.update(
            {
                "gen_ai.usage.input_tokens": record.prompt_tokens,
                "gen_ai.usage.output_tokens": record.completion_tokens,
                "fleetlm.outcome": record.outcome,
            }
        )
        hosted = record.engine or record.device  # a replica here took it (`Served.replica`): a model of the node
        name = f"{record.operation} {record.model}" if hosted else record.operation
        record.span.end(name, (record.outcome, record.message or record.outcome) if failed else None)
