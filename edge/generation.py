"""The edge's Generate stream: one node's stream passed to the client, and, when the node dies in the
middle of it and the model's deployment sets continue_on_failure, the same stream continued on another
replica from the text sent so far (the bookkeeping is `edge.continuation`'s).

It builds on the `Gateway` (`edge.gateway`): the attempt loop picks and calls the replica that opens
the stream, or the one that continues it; the gateway's breakers learn from how each call went.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import grpc

from edge import access_log, auth
from edge.continuation import Progress, prompt_tokenize_request, why_not, why_not_again
from edge.gateway import Attempt, Gateway, Target, log_failure, new_request_id, prefix_hash
from edge.metrics import CURRENT
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError
from mesh.inference_requests import validate_generate
from mesh.request_context import outgoing

log = logging.getLogger(__name__)

PROMPT_COUNT_TIMEOUT = 10.0  # seconds for the count of a cut request's prompt (Generation._charge_cut)


@dataclass
class Stream:
    """A Generate call that has sent its first event, and the replica it counts against until `end`."""

    call: Any
    first: inference_pb2.GenerateResponse
    target: Target
    model: str  # the model it serves (the request's, or its cpu_offload_model)
    ended: bool = False


class Generation:
    """Generate streams through one gateway (`Gateway.generate`)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._counting: set[asyncio.Task[None]] = set()  # prompts of cut requests being counted (_charge_cut)

    async def generate(
        self,
        request: inference_pb2.GenerateRequest,
        client_timeout: float | None = None,
        first_choice: int = 0,
        whole: bool = False,
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """The node's Generate stream: deltas, then one result. A replica that refuses before the first
        event (full, unloading, unreachable) is replaced by the next one; after it, a failure ends the
        stream with that error, and so does a stream that breaks the contract (an empty event, no result),
        unless the model's deployment sets continue_on_failure and the node went away: then the request
        goes on on another replica from the text sent so far (`_continue`). Closing this iterator cancels
        the call on the node. `first_choice` numbers its choices among its client request's for the metrics'
        gaps between tokens (one prompt of several, edge.prompt_batch); the events keep their own. `whole`:
        the client waits for the whole reply (a non-streamed OpenAI request), so the events are held until the
        result, and a reply cut mid-way that may not be continued runs again from the start elsewhere."""
        validate_generate(request)
        if not request.request_id:
            request.request_id = new_request_id()
        request_id = request.request_id
        timeout = self._gateway.bounded_timeout(client_timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        metadata = outgoing(request_id)  # the id and the trace context reach the node

        async def open_stream(attempt: inference_pb2.GenerateRequest, target: Target) -> Stream:
            left = max(0.001, deadline - loop.time())
            call = self._gateway.open_generate(target, attempt, left, metadata)
            try:
                first = await self._next_event(call, target, left)
            except BaseException:
                call.cancel()
                raise
            self._gateway.breakers.succeeded(target.address)
            return Stream(call, first, target, attempt.model)

        # The request's metrics (edge.metrics): its first token, the gaps between tokens, its usage.
        metrics = self._gateway.metrics
        counted = CURRENT.get() if metrics is not None else None
        if metrics is not None and counted is not None and request.model in self._gateway.feed.models:
            metrics.serving(counted, request.model)
        try:
            stream = await self._gateway.first_answer(
                request, request_id, open_stream, timeout, request.user, prefix_hash(request)
            )
        except FleetError as error:
            log_failure(request_id, error)
            raise
        if metrics is not None and counted is not None:
            metrics.serving(counted, request.model)  # a replica took it: a model of the fleet
        progress = Progress(request, held=[] if whole else None)
        access = access_log.current()  # the client request's access line
        streamed = request.delivery != inference_pb2.TEXT_DELIVERY_WHOLE  # else no gaps between tokens to time
        outputs = 0  # output events streamed on: what a client that leaves mid-stream was sent
        generated = 0  # output events from the node before its result: what a cut request is charged (auth)
        try:
            response = stream.first
            while True:
                try:
                    while not response.HasField("result"):
                        event = progress.forward(response)
                        kind = event.WhichOneof("event")
                        output = kind in ("delta", "tool_call")
                        generated += output
                        if metrics is not None and counted is not None:
                            if kind == "delta":
                                metrics.text(counted, streamed, first_choice + event.delta.index)
                                outputs += streamed
                            elif kind == "tool_call":
                                metrics.text(counted, streamed, first_choice)
                                outputs += streamed
                        if progress.held is None:
                            yield event
                        else:  # its first token reached the edge now, though it leaves with the result
                            if access is not None and output:
                                access.token()
                            progress.held.append(event)
                        response = await self._next_event(stream.call, stream.target, timeout)
                except FleetError as error:
                    cut = stream
                    stream, response = await self._continue(cut, progress, error, open_stream, deadline)
                    continue
                progress.check_choices(stream.target.node_id)
                event = progress.forward(response)
                if metrics is not None and counted is not None:
                    metrics.result(counted, event.result.usage.prompt_tokens, event.result.usage.completion_tokens)
                    outputs = 0  # its usage counts them
                generated = -1  # its usage is charged by the transport, which sees the result
                for held in progress.held or ():
                    yield held
                yield event
                if not stream.ended:
                    await stream.call.code()  # its status follows at once: the call ends on the node
                return
        except FleetError as error:
            if counted is not None:
                counted.code = error.code.value  # after the stream started: an HTTP status of 200 says nothing
            raise
        finally:
            self._end(stream)  # cancels a call still running: the node stops the work
            if generated >= 0:  # ended before its result (its client left, an error): its key pays what it used
                self._charge_cut(progress.request, stream.model, generated)
            if outputs:  # ended before its result (its client left, say): counted if the request was cancelled
                if metrics is not None and counted is not None:
                    metrics.cut(counted, outputs)
                if access is not None:
                    access.completion_tokens += outputs

    def _charge_cut(self, request: inference_pb2.GenerateRequest, model: str, generated: int) -> None:
        """A request cut before its result is charged to its key (edge.auth) what the node generated and its
        prompt, which the node read whole before its first event. The prompt's count, when it costs a call
        to the node (a text or a chat), is made only for a key with a limit on tokens, off the request's
        path: the count is charged when it comes."""
        admission = auth.admission()
        admission.charge(generated)
        if request.WhichOneof("input") == "prompt_token_ids":
            admission.charge(len(request.prompt_token_ids.ids))
            return
        if not admission.counts_tokens():
            return
        count = prompt_tokenize_request(request, model)

        async def charge_prompt() -> None:
            try:
                reply = await self._gateway.unary("Tokenize", count, PROMPT_COUNT_TIMEOUT, request.request_id)
            except (FleetError, asyncio.CancelledError) as error:  # the edge stopping cancels it
                log.info("request %s: its prompt was not counted for its API key: %s", request.request_id,
                         error or "the edge stopped")  # fmt: skip
                return
            admission.charge(len(reply.token_ids))

        task = asyncio.get_running_loop().create_task(charge_prompt())
        self._counting.add(task)
        task.add_done_callback(self._counting.discard)

    def _end(self, stream: Stream) -> None:
        if not stream.ended:
            stream.ended = True
            stream.call.cancel()  # a no-op once the call has ended
            self._gateway.release(stream.target)

    async def _continue(
        self,
        cut: Stream,
        progress: Progress,
        error: FleetError,
        open_stream: Attempt[Stream],
        deadline: float,
    ) -> tuple[Stream, inference_pb2.GenerateResponse]:
        """After `cut` failed mid-stream with `error`: the stream that continues it on another replica and
        its first event (or `cut` itself, ended, and the result when no token was left to generate); for a
        held reply that may not be continued, the stream that runs it again from the start. Raises `error`
        when neither may be done, naming why when it was tried and failed."""
        request = progress.request
        request_id = request.request_id
        known = self._gateway.feed.models.get(cut.model)
        reason = why_not(request, error, known is not None and known.continue_on_failure, progress.continued)
        again = bool(reason) and progress.held is not None and not why_not_again(error, progress.continued)
        node = cut.target.node_id
        if reason and not again:
            # The caller's own doing (its deadline passed) is no failure of the fleet's: quietly.
            level = logging.INFO if error.code == ErrorCode.CANCELLED else logging.WARNING
            log.log(level, "request %s: stream from node %s failed after it started: %s (not continued: %s)",
                    request_id, node, error, reason)  # fmt: skip
            raise error
        self._end(cut)
        progress.failed_nodes.add(node)
        avoid = frozenset(progress.failed_nodes)
        left = deadline - asyncio.get_running_loop().time()
        try:
            if left <= 0:
                raise FleetError(ErrorCode.BACKEND_TIMEOUT, "the request's timeout is spent")
            if again:
                continued: inference_pb2.GenerateRequest | None = progress.restart()
            elif progress.sent or progress.echoed:
                original, continuing = progress.tokenize_requests(cut.model)
                counts = await asyncio.gather(
                    self._gateway.unary("Tokenize", original, left, request_id, avoid),
                    self._gateway.unary("Tokenize", continuing, left, request_id, avoid),
                )
                continued = progress.cut(len(counts[0].token_ids), len(counts[1].token_ids))
            else:
                continued = progress.again()  # no text was sent: nothing to go on from, nor to count
            if continued is None:
                log.warning("request %s: node %s failed after the last token; the stream ends with its length",
                            request_id, node)  # fmt: skip
                return cut, progress.length_result(cut.model)
            continued.model = cut.model
            left = deadline - asyncio.get_running_loop().time()
            stream = await self._gateway.first_answer(
                continued, request_id, open_stream, left, request.user, prefix_hash(request), avoid
            )
        except FleetError as failed:
            attempt = "running it again" if again else "continuing"
            log.warning("request %s: stream from node %s failed after it started: %s (%s failed: %s)",
                        request_id, node, error, attempt, failed)  # fmt: skip
            raise FleetError(
                error.code,
                f"{error.message}; {attempt} on another replica failed: {failed.message}",
                retry_after_seconds=error.retry_after_seconds,
            ) from error
        self._gateway.continued_streams += 1
        if self._gateway.metrics is not None:
            self._gateway.metrics.series(request.model).failovers.inc()
        if again:
            log.warning("request %s: node %s failed before the reply was whole (%s); running it again on node %s"
                        " (attempt %d)", request_id, node, error, stream.target.node_id,
                        progress.continued + 1)  # fmt: skip
        else:
            log.warning("request %s: node %s failed after %d characters (%s); continued on node %s"
                        " (continuation %d)", request_id, node, progress.chars_before, error,
                        stream.target.node_id, progress.continued)  # fmt: skip
        return stream, stream.first

    async def _next_event(self, call: Any, target: Target, timeout: float) -> inference_pb2.GenerateResponse:
        """The stream's next event, checked: an error, an event with nothing in it and a stream that ends
        without its result all become a FleetError (retried elsewhere only before the first event)."""
        try:
            response = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise self._gateway.node_error(exc, target, timeout) from exc
        if response is grpc.aio.EOF:
            raise FleetError(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"node {target.node_id} ended the stream without a result",
                retry_after_seconds=1,
            )
        if response is None:  # grpc.aio's answer to bytes that do not parse (it logs the DecodeError)
            raise FleetError(ErrorCode.BACKEND_UNAVAILABLE, f"node {target.node_id} sent a malformed stream event")
        if response.WhichOneof("event") is None:
            raise FleetError(ErrorCode.BACKEND_UNAVAILABLE, f"node {target.node_id} sent an empty stream event")
        return response  # type: ignore[no-any-return]
