"""OpenAI's Responses API (`POST /v1/responses`) through the edge, with the real openai SDK and its stream
helper, answered by SmolLM2 through llama.cpp. A response is the same generation as the chat request it
translates to: greedy, the same text and token counts."""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from tests.conftest import Mesh

pytestmark = [pytest.mark.model, pytest.mark.cluster]

QUESTION = "Name three colors of the rainbow."
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.http}/v1", api_key="unused", max_retries=0, timeout=120)


def chat_text(client: openai.OpenAI, mesh: Mesh, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, Any]:
    reply = client.chat.completions.create(model=mesh.model, messages=messages, max_tokens=max_tokens, temperature=0)  # type: ignore[arg-type]
    return reply.choices[0].message.content or "", reply.usage


def test_a_response_is_the_chat_reply_with_its_usage(client: openai.OpenAI, mesh: Mesh) -> None:
    response = client.responses.create(model=mesh.model, input=QUESTION, max_output_tokens=24, temperature=0)
    text, usage = chat_text(client, mesh, [{"role": "user", "content": QUESTION}], 24)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.model == mesh.model
    assert response.output_text == text and text
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert response.usage.total_tokens == usage.total_tokens
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    # instructions are the system message, and a list of input items is the conversation
    items = [{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}]
    instructed = client.responses.create(model=mesh.model, instructions="Answer in French.", input=items,  # type: ignore[arg-type]
                                         max_output_tokens=16, temperature=0)  # fmt: skip
    expected, _ = chat_text(client, mesh, [{"role": "system", "content": "Answer in French."},
                                           {"role": "user", "content": QUESTION}], 16)  # fmt: skip
    assert instructed.output_text == expected


def test_a_response_cut_by_max_output_tokens_is_incomplete(client: openai.OpenAI, mesh: Mesh) -> None:
    response = client.responses.create(model=mesh.model, input=QUESTION, max_output_tokens=3, temperature=0)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 3
    assert response.output[0].status == "incomplete"


def test_the_stream_helper_builds_the_same_response_from_the_events(client: openai.OpenAI, mesh: Mesh) -> None:
    whole = client.responses.create(model=mesh.model, input=QUESTION, max_output_tokens=24, temperature=0)
    kinds, deltas = [], []
    with client.responses.stream(model=mesh.model, input=QUESTION, max_output_tokens=24, temperature=0) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == whole.output_text
    assert len(deltas) > 3, "the text arrived in one piece, not streamed"
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]  # fmt: skip
    assert final.usage is not None and whole.usage is not None
    assert final.usage.output_tokens == whole.usage.output_tokens
    raw = httpx.post(f"{mesh.http}/v1/responses", timeout=60,
                     json={"model": mesh.model, "input": "Hi", "max_output_tokens": 4, "stream": True})  # fmt: skip
    numbers = [json.loads(line[6:])["sequence_number"] for line in raw.text.splitlines() if line.startswith("data: ")]
    assert numbers == list(range(len(numbers))) and len(numbers) >= 7


def test_a_function_call_and_its_output_go_round_trip(client: openai.OpenAI, mesh: Mesh) -> None:
    asked: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    one_call: Any = {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
    called = client.responses.create(model=mesh.model, input=asked, max_output_tokens=60, temperature=0, **one_call)
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls and called.status == "completed", called.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
    assert isinstance(json.loads(call.arguments)["city"], str)
    history = [*asked, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 degrees"}]  # fmt: skip
    answered = client.responses.create(model=mesh.model, input=history, tools=[WEATHER], tool_choice="none",  # type: ignore[arg-type, list-item]
                                       max_output_tokens=24, temperature=0)  # fmt: skip
    assert answered.output_text and all(item.type == "message" for item in answered.output)
    # The same call, streamed: the helper puts the arguments together from their deltas
    pieces = []
    with client.responses.stream(model=mesh.model, input=asked, max_output_tokens=60, temperature=0,
                                 **one_call) as stream:  # fmt: skip
        for event in stream:
            if event.type == "response.function_call_arguments.delta":
                pieces.append(event.delta)
        final = stream.get_final_response()
    streamed = [item for item in final.output if item.type == "function_call"]
    assert streamed and "".join(pieces) == streamed[0].arguments == call.arguments


class Colors(BaseModel):
    first: str = Field(max_length=12)  # bounded, so that a looping small model still ends its document
    second: str = Field(max_length=12)


def test_text_format_json_schema_gives_a_parsed_answer(client: openai.OpenAI, mesh: Mesh) -> None:
    parsed = client.responses.parse(model=mesh.model, input=QUESTION, text_format=Colors, max_output_tokens=80,
                                    temperature=0)  # fmt: skip
    assert parsed.status == "completed"
    assert isinstance(parsed.output_parsed, Colors)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
        ({"input": "hi", "conversation": "conv_1"}, "conversation", "keeps no responses"),
        ({"input": "hi", "prompt": {"id": "pmpt_1"}}, "prompt", "stored prompt templates"),
        ({"input": "hi", "background": True}, "background", "keeps no responses"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type", "function tools"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
         "input[0].content[0]", "text only"),
        ({"input": []}, "input", "must not be empty"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "not supported"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role", "must be one of"),
        ({"input": "hi", "temperature": 3}, "temperature", "between 0 and 2"),
        ({"input": "hi", "store": [[1]]}, "store", "bool"),  # accepted as a boolean, and only as one
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "between 1 and"),
        # A text part without its text names the text, not the part (it was "'input_text' content is not supported").
        ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_text"}]}]},
         "input[0].content[0].text", "must be a string"),
        ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type", "json_schema"),
        ({"input": "hi", "include": ["message.output_text.logprobs"]}, "include", "not supported"),
        ({"input": "hi", "top_logprobs": 3}, "top_logprobs", "chat completions"),
        ({"input": "hi", "truncation": "auto"}, "truncation", "drops nothing"),
        ({"input": "hi", "reasoning": {"effort": "high"}}, "reasoning.effort", "no reasoning budget"),
        ({"input": "hi", "reasoning": {"effort": None, "summary": "auto"}}, "reasoning.summary", "or summary"),
        ({"input": "hi", "tool_choice": {"type": "web_search"}}, "tool_choice", "function"),
        ({"input": [{"type": "function_call_output", "call_id": "call_9", "output": "sunny"}]}, "input[0].call_id",
         "answers no function_call before it"),
        ({"input": [{"type": "function_call", "call_id": "", "name": "get_weather", "arguments": "{}"}]},
         "input[0].call_id", "non-empty string"),
        # A call with no output before the model's next turn (it was taken, and the model went on from it).
        ({"input": [{"role": "user", "content": "Weather?"},
                    {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                    {"role": "user", "content": "go on"}]}, "input[1]", "no function_call_output answers"),
        ({"input": [{"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}]},
         "input[0]", "no function_call_output answers"),
        # A tool's fields are named as this API holds them (they were named tools[0].function.parameters).
        ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}}]},
         "tools[0].parameters", "tools[0].parameters"),
        ({"input": "hi", "tools": [{**WEATHER}, {**WEATHER}]}, "tools[1].name", "tools[1].name"),
        # Refused further on, by the chat's checks and the node's: named as this API names them.
        ({"input": "word " * 4000}, "input", "context"),
        ({"input": "hi", "max_output_tokens": 100_000}, "max_output_tokens", "max_output_tokens (100000) exceeds"),
        ({"input": [{"role": "user", "content": "x" * 600_000}] * 2}, "input", "'input' has more than"),
    ],
)  # fmt: skip
def test_what_fleetlm_cannot_do_is_a_400_naming_the_field(mesh: Mesh, body: dict[str, Any], param: str,
                                                          says: str) -> None:  # fmt: skip
    reply = httpx.post(f"{mesh.http}/v1/responses", json={"model": mesh.model, **body}, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert not any(chat in error["message"] for chat in ("messages", "max_tokens", "response_format")), error
    streamed = httpx.post(f"{mesh.http}/v1/responses", json={"model": mesh.model, **body, "stream": True}, timeout=60)
    assert (streamed.status_code, streamed.json()["error"]) == (400, error)


def test_a_missing_model_and_an_unknown_one_are_refused_as_for_chat(mesh: Mesh) -> None:
    missing = httpx.post(f"{mesh.http}/v1/responses", json={"input": "hi"}, timeout=30)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    unknown = httpx.post(f"{mesh.http}/v1/responses", json={"model": "nope", "input": "hi"}, timeout=30)
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]["message"]


def test_the_prompt_is_the_chat_conversation_the_items_make(mesh: Mesh, client: openai.OpenAI) -> None:
    """A function call joins the assistant's turn and its output answers it: the prompt counted is the one
    Tokenize gives for the same chat."""
    history = [{"role": "user", "content": "Weather in Rome?"},
               {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Rome"}'},
               {"type": "function_call_output", "call_id": "call_1", "output": "Rain"}]  # fmt: skip
    response = client.responses.create(model=mesh.model, input=history, tools=[WEATHER], max_output_tokens=4,  # type: ignore[arg-type, list-item]
                                       temperature=0)  # fmt: skip
    chat = inference_pb2.ChatConversation(
        messages=[
            inference_pb2.ChatMessage(role="user", content="Weather in Rome?"),
            inference_pb2.ChatMessage(role="assistant", tool_calls=[inference_pb2.ToolCall(
                id="call_1", function=inference_pb2.FunctionCall(name="get_weather", arguments='{"city":"Rome"}'))]),
            inference_pb2.ChatMessage(role="tool", content="Rain", tool_call_id="call_1"),
        ],
        tools=[inference_pb2.Tool(function=inference_pb2.FunctionDefinition(
            name="get_weather", description=WEATHER["description"], parameters=json.dumps(WEATHER["parameters"]),
            strict=True))],
    )  # fmt: skip
    with grpc.insecure_channel(mesh.grpc) as channel:
        tokens = inference_pb2_grpc.InferenceServiceStub(channel).Tokenize(
            inference_pb2.TokenizeRequest(model=mesh.model, chat=chat), timeout=10
        )
    assert response.usage is not None and response.usage.input_tokens == len(tokens.token_ids)


def test_a_call_cut_by_max_output_tokens_is_incomplete_in_the_whole_response_as_in_the_stream() -> None:
    """The item max_output_tokens cut (the last) has the response's status, its arguments perhaps half a
    JSON object; the earlier ones are completed. Not streamed, every call said "completed" (the stream said
    "incomplete" for the cut one): a client trusting it ran a tool with broken arguments."""
    from edge.responses_protocol import ResponseShape, ResponsesRequest

    shape = ResponseShape(ResponsesRequest.model_validate({"model": "m", "input": "hi"}), "m")
    calls = [inference_pb2.ToolCall(id=f"call_{i}", function=inference_pb2.FunctionCall(name="f", arguments=a))
             for i, a in enumerate(['{"city": "Oslo"}', '{"city'])]  # fmt: skip
    cut = inference_pb2.GenerateResult(finish_reason=inference_pb2.FINISH_REASON_LENGTH, tool_calls=calls)
    body = shape.full("", cut)
    assert body["status"] == "incomplete"
    assert [(item["type"], item["status"]) for item in body["output"]] == [
        ("function_call", "completed"),
        ("function_call", "incomplete"),
    ]
    told = shape.full("Let me look.", cut)  # text before the calls: complete, as the stream closes it
    assert [item["status"] for item in told["output"]] == ["completed", "completed", "incomplete"]
    ended = inference_pb2.GenerateResult(finish_reason=inference_pb2.FINISH_REASON_TOOL_CALLS, tool_calls=calls)
    assert {item["status"] for item in shape.full("", ended)["output"]} == {"completed"}


def test_an_empty_reply_is_one_empty_message_streamed_as_whole() -> None:
    """A reply with no text and no call (the model's first token ended it): the whole response has one empty
    message, and the stream's last event said the output was empty."""
    import json

    from edge.responses_protocol import ResponseEvents, ResponseShape, ResponsesRequest

    shape = ResponseShape(ResponsesRequest.model_validate({"model": "m", "input": "hi"}), "m")
    ended = inference_pb2.GenerateResult(finish_reason=inference_pb2.FINISH_REASON_STOP)
    whole = shape.full("", ended)["output"]
    events = [json.loads(e.split(b"data: ", 1)[1]) for e in ResponseEvents(shape).finish(ended)]
    assert [e["type"] for e in events] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    streamed = events[-1]["response"]["output"]
    assert [(i["type"], i["status"], i["content"][0]["text"]) for i in streamed] == [("message", "completed", "")]
    assert [(i["type"], i["status"]) for i in whole] == [(i["type"], i["status"]) for i in streamed]
