"""Several prompts in one completions request (OpenAI's `prompt` as a list of strings).

Each prompt is a Generate request of its own through the gateway (routed, retried and continued as any
other), at most WINDOW of them at a time (fewer for an API key with a lower limit on requests at once),
and their streams are merged into one, numbered as OpenAI numbers the choices: prompt i's choice j is
choice i * n + j. Every choice ends with a ChoiceEnd and the merged stream with one GenerateResult whose
usage is the sum of the prompts', so the HTTP layer serves it as one request with that many choices. An
error in any prompt ends the whole request (the others are cancelled): before the first event it is the
request's error, after it an error event of the stream, as for one prompt.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Callable, Sequence

from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError
from mesh.lifecycle import cancelled_by_caller

# Prompts generating at once. More would only wait in the nodes' queues, and a batch larger than the
# fleet's queues would be refused as a whole (429) although it would be served a window at a time.
WINDOW = 8

Stream = AsyncGenerator[inference_pb2.GenerateResponse, None]


async def merged(opens: Sequence[Callable[[], Stream]], n: int, at_once: int = WINDOW) -> Stream:
    """The merged stream of the prompts whose Generate streams `opens` opens (prompt i: `opens[i]()`), each
    asking for `n` choices, at most `at_once` generating at a time. Closing it cancels every prompt still
    generating."""
    queue: asyncio.Queue[tuple[int, inference_pb2.GenerateResponse | BaseException | None]] = asyncio.Queue()
    window = asyncio.Semaphore(max(1, at_once))

    async def pump(prompt: int) -> None:
        async with window:
            stream = opens[prompt]()
            try:
                async for event in stream:
                    queue.put_nowait((prompt, event))
                queue.put_nowait((prompt, None))
            except asyncio.CancelledError:
                if cancelled_by_caller():
                    raise
                # The node's call, cancelled by its channel's close: this prompt's failure, not the request's
                # stop (the merged stream would wait for its end for good).
                queue.put_nowait((prompt, FleetError(ErrorCode.BACKEND_UNAVAILABLE, "the call to the node was cut")))
            except BaseException as error:
                queue.put_nowait((prompt, error))
            finally:
                await stream.aclose()  # cancels the node's work when the request ends early

    tasks = [asyncio.create_task(pump(prompt)) for prompt in range(len(opens))]
    total = inference_pb2.GenerateResult()
    pending = len(opens)
    try:
        while pending:
            prompt, item = await queue.get()
            if item is None:
                pending -= 1
                continue
            if isinstance(item, FleetError) and item.param == "prompt" and item.message.startswith("prompt["):
                # A node names a token by its place in the prompt it was given: here that is prompt i's.
                raise dataclasses.replace(item, message=f"prompt[{prompt}]{item.message[len('prompt') :]}")
            if isinstance(item, BaseException):
                raise item
            offset = prompt * n
            kind = item.WhichOneof("event")
            if kind == "delta":
                item.delta.index += offset
                yield item
            elif kind == "choice_end":
                item.choice_end.index += offset
                yield item
            elif kind == "prompt":  # an echoed prompt begins its own choices
                item.prompt.index += offset
                yield item
            elif kind == "result":
                result = item.result
                if n == 1:  # its end was the result; here it is one choice among the others
                    end = inference_pb2.ChoiceEnd(index=offset, finish_reason=result.finish_reason)
                    yield inference_pb2.GenerateResponse(choice_end=end)
                if prompt == 0:  # the result names the first choice's reason, model and node
                    total.model, total.node_id, total.finish_reason = result.model, result.node_id, result.finish_reason
                total.usage.prompt_tokens += result.usage.prompt_tokens
                total.usage.completion_tokens += result.usage.completion_tokens
                total.usage.total_tokens += result.usage.total_tokens
            else:  # a completion has no tool calls: an event this stream cannot place is passed on as it is
                yield item
        yield inference_pb2.GenerateResponse(result=total)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
