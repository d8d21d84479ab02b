"""A stream cut by a failed node, continued on another replica (a deployment's continue_on_failure), in
process: the edge's Gateway and HTTP app over real grpc.aio node stand-ins that stream a script and then
fail as a crashed engine does. What is tested is the edge's decision and bookkeeping: what the next
replica is asked (prompt + the text sent, or the conversation + the reply sent as a final assistant
message to continue; the tokens left, the same sampling), and what the client sees (one stream, offsets
and usage over the whole output, one finish reason). The same with real processes and the real model:
tests/test_continue_e2e.py; the node's side of a continued chat: tests/test_continue_chat.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import httpx
import openai
import pytest

from edge.gateway import Gateway
from edge.http_app import create_app
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError
from tests.test_gateway_attempts import Fleet, Node, following, standin_fleet, table


@dataclass
class Scripted(Node):
    """Streams `deltas` (one token per character, as its Tokenize counts), then either fails as a crashed
    engine (`dies`) or ends with a result whose usage counts its own prompt and output. A conversation
    counts as a template renders it: one token per message and per character of its text, and one for
    the generation prompt unless the final message is continued."""

    deltas: list[str] = field(default_factory=list)
    dies: bool = False
    requests: list[inference_pb2.GenerateRequest] = field(default_factory=list)

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        self.requests.append(request)
        offset = 0
        for text in self.deltas:
            delta = inference_pb2.TextDelta(text=text)
            if request.sampling.logprobs:
                delta.logprobs.append(inference_pb2.TokenLogprob(token=text, logprob=-0.5, text_offset=offset))
            offset += len(text)
            yield inference_pb2.GenerateResponse(delta=delta)
        if self.dies:
            raise FleetError(ErrorCode.BACKEND_UNAVAILABLE, f"engine on {self.node_id} crashed", retry_after_seconds=1)
        usage = inference_pb2.Usage(prompt_tokens=self.count(request), completion_tokens=offset)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        yield inference_pb2.GenerateResponse(
            result=inference_pb2.GenerateResult(
                finish_reason=inference_pb2.FINISH_REASON_STOP, usage=usage, model=request.model, node_id=self.node_id
            )
        )

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        return inference_pb2.TokenizeResponse(token_ids=[0] * self.count(request), context_size=2048)

    @staticmethod
    def count(request: inference_pb2.GenerateRequest | inference_pb2.TokenizeRequest) -> int:
        if request.WhichOneof("input") != "chat":
            return len(request.text if isinstance(request, inference_pb2.TokenizeRequest) else request.prompt)
        chat = request.chat
        return sum(1 + len(m.content) for m in chat.messages) + (0 if chat.continue_final_message else 1)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    async with standin_fleet() as fleet:
        yield fleet


def prompt_request(prompt: str = "P: ", max_tokens: int = 20) -> inference_pb2.GenerateRequest:
    sampling = inference_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.7, seed=42, stops=["Hello", "END"], logprobs=True
    )
    return inference_pb2.GenerateRequest(model="m", prompt=prompt, sampling=sampling)


async def serve(fleet: Fleet, *nodes: Scripted, opted_in: bool = True) -> None:
    """Publish a table where the nodes serve "m", the first the least loaded (so tried first)."""
    for node in nodes:
        await fleet.node(node)
    snapshot = table(*[(node, load) for load, node in enumerate(nodes)])
    snapshot.models[0].continue_on_failure = opted_in
    fleet.routing.table = snapshot


async def events_of(gateway: Gateway, request: inference_pb2.GenerateRequest) -> list[inference_pb2.GenerateResponse]:
    return [event async for event in gateway.generate(request)]


def text_of(events: list[inference_pb2.GenerateResponse]) -> str:
    return "".join(e.delta.text for e in events if e.HasField("delta"))


async def test_a_cut_stream_goes_on_on_the_next_replica_from_the_text_sent(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    a = Scripted("a", deltas=["Once", " upon"], dies=True)
    b = Scripted("b", deltas=[" a", " time"], dies=True)
    c = Scripted("c", deltas=[" there", "."])
    await serve(fleet, a, b, c)
    caplog.set_level(logging.INFO, logger="edge")
    async with following(fleet.gateway()) as gateway:
        events = await events_of(gateway, prompt_request())
        assert gateway.continued_streams == 2
    # b was asked to go on from what a sent; c from what a and b sent: the prompt followed by the text sent,
    # the tokens left of max_tokens (one token per character here), the same sampling, seed and stops.
    assert [r.prompt for r in b.requests] == ["P: Once upon"]
    assert [r.prompt for r in c.requests] == ["P: Once upon a time"]
    assert b.requests[0].sampling.max_tokens == 20 - len("Once upon")
    assert c.requests[0].sampling.max_tokens == 20 - len("Once upon a time")
    for continued in (b.requests[0], c.requests[0]):
        assert continued.sampling.seed == 42 and continued.sampling.temperature == pytest.approx(0.7)
        assert list(continued.sampling.stops) == ["Hello", "END"] and continued.sampling.logprobs
        assert continued.request_id == a.requests[0].request_id
    # The client sees one stream: every delta once, offsets over the whole output, one result whose usage
    # counts the original prompt and every token generated on the three replicas.
    assert text_of(events) == "Once upon a time there."
    assert sum(e.HasField("result") for e in events) == 1 and events[-1].HasField("result")
    offsets = [lp.text_offset for e in events[:-1] for lp in e.delta.logprobs]
    assert offsets == [0, 4, 9, 11, 16, 22]
    usage = events[-1].result.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len("P: "), len("Once upon a time there."))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert events[-1].result.finish_reason == inference_pb2.FINISH_REASON_STOP
    # Counted and logged with the request id.
    request_id = a.requests[0].request_id
    continued_lines = [r.getMessage() for r in caplog.records if "continued on node" in r.getMessage()]
    assert len(continued_lines) == 2 and all(request_id in line for line in continued_lines)


async def test_without_the_opt_in_the_cut_is_an_error(fleet: Fleet) -> None:
    a = Scripted("a", deltas=["Once"], dies=True)
    b = Scripted("b", deltas=[" upon"])
    await serve(fleet, a, b, opted_in=False)
    received: list[str] = []
    async with following(fleet.gateway()) as gateway:
        with pytest.raises(FleetError) as caught:
            async for event in gateway.generate(prompt_request()):
                received.append(event.delta.text)
        assert gateway.continued_streams == 0
    assert received == ["Once"] and b.requests == []
    assert caught.value.code == ErrorCode.BACKEND_UNAVAILABLE and "engine on a crashed" in caught.value.message


def chat_request(*messages: tuple[str, str], continue_final: bool = False) -> inference_pb2.GenerateRequest:
    chat = inference_pb2.ChatConversation(
        messages=[inference_pb2.ChatMessage(role=role, content=content) for role, content in messages],
        continue_final_message=continue_final,
    )
    sampling = inference_pb2.SamplingParams(max_tokens=20, temperature=0, seed=3, logprobs=True)
    return inference_pb2.GenerateRequest(model="m", chat=chat, sampling=sampling)


async def test_a_cut_chat_stream_goes_on_as_the_final_assistant_message(fleet: Fleet) -> None:
    a = Scripted("a", deltas=["Hi", " there"], dies=True)
    b = Scripted("b", deltas=[",", " friend"], dies=True)
    c = Scripted("c", deltas=["."])
    await serve(fleet, a, b, c)
    request = chat_request(("system", "Be brief."), ("user", "Greet me"))
    async with following(fleet.gateway()) as gateway:
        events = await events_of(gateway, request)
        assert gateway.continued_streams == 2
    # b gets the conversation with what a sent as an assistant message to continue, c the same with what
    # a and b sent (one message, not one per replica); the tokens left, the same sampling and seed.
    for node, sent in ((b, "Hi there"), (c, "Hi there, friend")):
        [continued] = node.requests
        assert [(m.role, m.content) for m in continued.chat.messages] == [
            ("system", "Be brief."),
            ("user", "Greet me"),
            ("assistant", sent),
        ]
        assert continued.chat.continue_final_message
        assert continued.sampling.max_tokens == 20 - len(sent)
        assert continued.sampling.seed == 3 and continued.sampling.temperature == 0 and continued.sampling.logprobs
    assert not a.requests[0].chat.continue_final_message and len(a.requests[0].chat.messages) == 2
    assert text_of(events) == "Hi there, friend."
    assert [lp.text_offset for e in events[:-1] for lp in e.delta.logprobs] == [0, 2, 8, 9, 16]
    usage = events[-1].result.usage
    prompt_tokens = (1 + len("Be brief.")) + (1 + len("Greet me")) + 1
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, len("Hi there, friend."))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_a_cut_chat_stream_with_tools_is_not_continued(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    """Calls already streamed have ids and arguments the next replica knows nothing of: the cut ends the
    stream with its error, and the log says why it was not continued."""
    a = Scripted("a", deltas=["Let me check."], dies=True)
    b = Scripted("b", deltas=["never"])
    await serve(fleet, a, b)
    request = chat_request(("user", "Weather in Paris?"))
    request.chat.tools.add(function=inference_pb2.FunctionDefinition(name="get_weather"))
    caplog.set_level(logging.INFO, logger="edge")
    async with following(fleet.gateway()) as gateway:
        with pytest.raises(FleetError) as caught:
            await events_of(gateway, request)
        assert gateway.continued_streams == 0
    assert b.requests == [] and caught.value.code == ErrorCode.BACKEND_UNAVAILABLE
    assert any("not continued: a reply with tools" in r.getMessage() for r in caplog.records)


async def test_a_chat_that_continues_a_reply_already_goes_on_in_that_reply(fleet: Fleet) -> None:
    a = Scripted("a", deltas=[" blue"], dies=True)
    b = Scripted("b", deltas=["."])
    await serve(fleet, a, b)
    request = chat_request(("user", "Sky colour?"), ("assistant", "It is"), continue_final=True)
    async with following(fleet.gateway()) as gateway:
        events = await events_of(gateway, request)
    [continued] = b.requests
    assert [(m.role, m.content) for m in continued.chat.messages] == [
        ("user", "Sky colour?"),
        ("assistant", "It is blue"),
    ]
    assert continued.chat.continue_final_message and continued.sampling.max_tokens == 20 - len(" blue")
    assert text_of(events) == " blue."
    assert events[-1].result.usage.prompt_tokens == (1 + len("Sky colour?")) + (1 + len("It is"))


async def test_a_stream_cut_before_any_text_is_sent_again_as_it_was(fleet: Fleet) -> None:
    a = Scripted("a", deltas=[""], dies=True)  # a first event with no text (a token of a split character)
    b = Scripted("b", deltas=["Hello"])
    await serve(fleet, a, b)
    request = chat_request(("user", "Greet me"))
    async with following(fleet.gateway()) as gateway:
        events = await events_of(gateway, request)
        assert gateway.continued_streams == 1
    [again] = b.requests
    assert again.chat == a.requests[0].chat and again.sampling == a.requests[0].sampling
    assert text_of(events) == "Hello"
    usage = events[-1].result.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (Scripted.count(again), len("Hello"))


async def test_with_no_other_replica_the_cut_is_an_error_that_says_why(fleet: Fleet) -> None:
    a = Scripted("a", deltas=["Once"], dies=True)
    await serve(fleet, a)
    async with following(fleet.gateway()) as gateway:
        with pytest.raises(FleetError) as caught:
            await events_of(gateway, prompt_request())
        assert gateway.continued_streams == 0
        assert [r.own for r in gateway.feed.table.replicas("m")] == [0]  # nothing left counted against a
    assert caught.value.code == ErrorCode.BACKEND_UNAVAILABLE
    assert "engine on a crashed" in caught.value.message
    assert "continuing on another replica failed" in caught.value.message
    assert len(a.requests) == 1  # the failed node is not asked again


async def test_a_cut_after_the_last_token_ends_with_length(fleet: Fleet) -> None:
    a = Scripted("a", deltas=["abc", "de"], dies=True)  # max_tokens 5: all of them came before the cut
    b = Scripted("b", deltas=["never"])
    await serve(fleet, a, b)
    async with following(fleet.gateway()) as gateway:
        events = await events_of(gateway, prompt_request(max_tokens=5))
    assert text_of(events) == "abcde" and b.requests == []
    result = events[-1].result
    assert result.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (3, 5, 8)


async def test_the_openai_client_sees_one_stream_over_http(fleet: Fleet) -> None:
    a = Scripted("a", deltas=["Once", " upon"], dies=True)
    b = Scripted("b", deltas=[" a", " time"])
    await serve(fleet, a, b)
    async with following(fleet.gateway()) as gateway:
        transport = httpx.ASGITransport(app=create_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://edge") as http:
            client = openai.AsyncOpenAI(base_url="http://edge/v1", api_key="unused", http_client=http)
            stream = await client.completions.create(
                model="m", prompt="P: ", max_tokens=20, stream=True, stream_options={"include_usage": True}
            )
            chunks = [chunk async for chunk in stream]
            whole = await client.completions.create(model="m", prompt="P: ", max_tokens=20, logprobs=1)
            health = (await http.get("/health")).json()
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == "Once upon a time" and finishes == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, len(text))
    assert whole.choices[0].text == text and whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.completion_tokens == len(text)
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.text_offset == [0, 4, 9, 11]
    assert health["continued_streams"] == 2


async def test_a_reply_waited_for_whole_runs_again_from_the_start_without_the_opt_in(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """A non-streamed request's client was sent nothing when its node failed: whatever it asks for, it is
    run again as it was on another replica, and the client gets that replica's reply alone."""
    a = Scripted("a", deltas=["Once", " upon"], dies=True)
    b = Scripted("b", deltas=["Hello", " there."])
    await serve(fleet, a, b, opted_in=False)
    caplog.set_level(logging.INFO, logger="edge")
    request = prompt_request()
    async with following(fleet.gateway()) as gateway:
        events = [event async for event in gateway.generate(request, whole=True)]
        assert gateway.continued_streams == 1
        assert [r.own for r in gateway.feed.table.replicas("m")] == [0, 0]  # nothing left counted
    [again] = b.requests
    first = a.requests[0]
    assert again.prompt == first.prompt == "P: " and again.sampling == first.sampling
    assert again.request_id == first.request_id
    assert text_of(events) == "Hello there."  # nothing of a's
    offsets = [lp.text_offset for e in events[:-1] for lp in e.delta.logprobs]
    assert offsets == [0, 5]
    usage = events[-1].result.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len("P: "), len("Hello there."))
    lines = [r.getMessage() for r in caplog.records if "running it again on node b" in r.getMessage()]
    assert len(lines) == 1 and first.request_id in lines[0] and "engine on a crashed" in lines[0]


async def test_a_reply_waited_for_whole_that_may_not_be_continued_runs_again(fleet: Fleet) -> None:
    """Opted in, but with tools (no continuation mid-way): a reply waited for whole still runs again."""
    a = Scripted("a", deltas=["Let me"], dies=True)
    b = Scripted("b", deltas=["Sunny."])
    await serve(fleet, a, b)
    request = chat_request(("user", "Weather?"))
    request.chat.tools.add().function.name = "weather"
    async with following(fleet.gateway()) as gateway:
        events = [event async for event in gateway.generate(request, whole=True)]
    [again] = b.requests
    assert again.chat == a.requests[0].chat  # not continued: the conversation as the client sent it
    assert text_of(events) == "Sunny."


async def test_a_reply_waited_for_whole_is_tried_on_each_replica_once_then_says_why(fleet: Fleet) -> None:
    a = Scripted("a", deltas=["Once"], dies=True)
    b = Scripted("b", deltas=["Hello"], dies=True)
    await serve(fleet, a, b, opted_in=False)
    async with following(fleet.gateway()) as gateway:
        with pytest.raises(FleetError) as caught:
            [event async for event in gateway.generate(prompt_request(), whole=True)]
        assert [r.own for r in gateway.feed.table.replicas("m")] == [0, 0]
    assert (len(a.requests), len(b.requests)) == (1, 1)
    assert caught.value.code == ErrorCode.BACKEND_UNAVAILABLE
    assert "running it again on another replica failed" in caught.value.message, caught.value.message


async def test_the_openai_client_gets_the_reply_run_again_over_http(fleet: Fleet) -> None:
    a = Scripted("a", deltas=["Once", " upon"], dies=True)
    b = Scripted("b", deltas=["Hello", " there."])
    await serve(fleet, a, b, opted_in=False)
    async with following(fleet.gateway()) as gateway:
        transport = httpx.ASGITransport(app=create_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://edge") as http:
            client = openai.AsyncOpenAI(base_url="http://edge/v1", api_key="unused", http_client=http)
            chat = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=20, n=1
            )
            response = await client.responses.create(model="m", input="Hi", max_output_tokens=20)
    assert chat.choices[0].message.content == "Hello there." and chat.choices[0].finish_reason == "stop"
    assert chat.system_fingerprint == "b"
    assert response.output_text == "Hello there." and response.status == "completed"
    assert len(a.requests) == 2 and len(b.requests) == 2
