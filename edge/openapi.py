"""The OpenAPI description of the routes FastAPI does not see, merged into FastAPI's own document.

/v1/chat/completions and /v1/completions are served as plain ASGI in front of FastAPI (the hot path,
edge.http_app.GenerationRoutes), and /v1/embeddings reads its body itself; FastAPI knows none of their
shapes. They are written here from the same tables the requests are checked against
(mesh.inference_requests: SAMPLING_BOUNDS, MAX_MESSAGES, MAX_PROMPT_CHARS, ...), so that /openapi.json and
/docs say what the edge accepts and answers, and a fuzzer (schemathesis, tests/test_fuzz_http.py) can hold
the edge to it: what the document forbids is refused with a 4xx, what it allows never gets a 5xx, and
every answer has the documented shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from edge.auth import needs_key
from edge.http_limits import HttpLimits
from edge.openai_protocol import CHAT_REFUSED, MAX_PROMPTS, VLLM_REFUSED
from mesh.inference_requests import (
    FUNCTION_NAME,
    INT32_MAX,
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_PROMPT_CHARS,
    MAX_SCHEMA_CHARS,
    MAX_STOPS,
    MAX_TOKEN_IDS,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    OPENAI_SEED,
    ROLES,
    SAMPLING_BOUNDS,
    SCHEMA_NAME,
    Bound,
)

JSON = "application/json"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _bounded(name: str, kind: str, bound: Bound | None = None, description: str = "") -> Schema:
    """An optional number from the one table of bounds (SAMPLING_BOUNDS), or within `bound` where the HTTP
    API takes more than gRPC can carry."""
    bound = bound or SAMPLING_BOUNDS[name]
    schema: Schema = {"type": kind, "maximum": bound.high}
    schema["exclusiveMinimum" if bound.low_open else "minimum"] = bound.low
    if description:
        schema["description"] = description
    return _nullable(schema)


_TEXT = {"type": "string", "maxLength": MAX_PROMPT_CHARS}


def _refused(message: str) -> Schema:
    """A field other servers take that fleetlm refuses (a 400 naming it) unless it asks for nothing."""
    return {"enum": [None, False, 0, [], {}], "description": f"refused unless null, false, 0 or empty: {message}"}


def _sampling_properties() -> Schema:
    return {
        **{field: _refused(message) for field, message in VLLM_REFUSED.items()},
        # Required, and not blank: a request without one is MODEL_REQUIRED.
        "model": {"type": "string", "pattern": r"\S", "description": "a model the fleet serves (GET /v1/models)"},
        "max_tokens": _bounded("max_tokens", "integer"),
        "temperature": _bounded("temperature", "number"),
        "top_p": _bounded("top_p", "number"),
        "top_k": _bounded("top_k", "integer"),
        "min_p": _bounded("min_p", "number"),
        "seed": _bounded(
            "seed", "integer", OPENAI_SEED, "a negative seed is taken as its 64-bit two's complement (-1 is 2^64 - 1)"
        ),
        "stop": _nullable(
            {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "maxItems": MAX_STOPS, "items": {"type": "string", "minLength": 1}},
                ]
            }
        ),
        "presence_penalty": _bounded("presence_penalty", "number"),
        "frequency_penalty": _bounded("frequency_penalty", "number"),
        "repetition_penalty": _bounded("repetition_penalty", "number"),
        "stream": {"type": "boolean", "default": False, "description": "answer as server-sent events"},
        "stream_options": _nullable(
            {
                "type": "object",
                "properties": {"include_usage": {"type": "boolean", "default": False}},
                "description": "only with stream: true (else a 400 naming it, as OpenAI answers)",
            }
        ),
        "n": {
            **_bounded("n", "integer"),
            "default": 1,
            "description": f"choices to generate, 1 to {MAX_CHOICES}, returned as choices[].index; at most the"
            " model's replica runs at once (its max_running_requests), else a 400 naming n",
        },
        "user": _nullable({"type": "string"}),
        "response_format": _nullable(_ref("ResponseFormat")),
        "logit_bias": _nullable(
            {
                "type": "object",
                "maxProperties": MAX_LOGIT_BIAS,
                "propertyNames": {"pattern": "^[0-9]{1,10}$"},
                "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                "description": "token id (as a string) -> a bias added to its logit before sampling, -100 (bans"
                " it) to 100; an id the model does not have is a 400 naming logit_bias",
            }
        ),
    }


def _response_format_schemas() -> dict[str, Schema]:
    """OpenAI's response_format. What a JSON schema may use is the engine's to say: the llama.cpp engine
    refuses keywords its grammar cannot enforce with a 400 naming response_format."""

    def kind(name: str) -> Schema:
        return {"type": "string", "enum": [name]}

    json_schema = {
        "type": "object",
        "required": ["name", "schema"],
        "properties": {
            "name": {"type": "string", "pattern": SCHEMA_NAME.pattern.join("^$")},
            "description": _nullable({"type": "string"}),
            "schema": {
                "type": "object",
                "description": f"a JSON schema, at most {MAX_SCHEMA_CHARS} characters as JSON text",
            },
            "strict": _nullable({"type": "boolean"}),
        },
    }
    return {
        "ResponseFormat": {
            "description": "text (the default), any JSON object, or JSON valid against a schema; decoding is"
            " constrained to it. A reply cut by max_tokens (finish_reason length) may be incomplete.",
            "anyOf": [
                {"type": "object", "required": ["type"], "properties": {"type": kind("text")}},
                {"type": "object", "required": ["type"], "properties": {"type": kind("json_object")}},
                {
                    "type": "object",
                    "required": ["type", "json_schema"],
                    "properties": {"type": kind("json_schema"), "json_schema": _ref("JsonSchemaFormat")},
                },
            ],
        },
        "JsonSchemaFormat": json_schema,
    }


def _tool_schemas() -> dict[str, Schema]:
    """OpenAI's tools and tool_choice, and the tool calls of the history. What a parameters schema may use
    is the engine's to say, as for response_format (a 400 naming `tools[i].function.parameters`)."""
    function = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": FUNCTION_NAME.pattern.join("^$")},
            "description": _nullable({"type": "string"}),
            "parameters": _nullable(
                {
                    "type": "object",
                    "properties": {"type": {"type": "string", "enum": ["object"]}},
                    "description": f"a JSON schema of an object, at most {MAX_SCHEMA_CHARS} characters as JSON text",
                }
            ),
            "strict": _nullable({"type": "boolean"}),
        },
    }
    call = {
        "type": "object",
        "required": ["id", "function"],
        "properties": {
            "id": {"type": "string", "minLength": 1},
            "type": {"type": "string", "enum": ["function"]},
            "function": {
                "type": "object",
                "required": ["name", "arguments"],
                "properties": {"name": {"type": "string", "minLength": 1}, "arguments": {"type": "string"}},
            },
        },
    }
    return {
        "Tool": {
            "type": "object",
            "required": ["type", "function"],
            "properties": {"type": {"type": "string", "enum": ["function"]}, "function": function},
        },
        "ToolChoice": {
            "description": "none, auto (the default with tools), required, or a function the model must call;"
            " required and a function need tools",
            "anyOf": [
                {"type": "string", "enum": ["none", "auto", "required"]},
                {
                    "type": "object",
                    "required": ["type", "function"],
                    "properties": {
                        "type": {"type": "string", "enum": ["function"]},
                        "function": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": {"type": "string"}},
                        },
                    },
                },
            ],
        },
        "ToolCall": call,
    }


def _request_schemas() -> dict[str, Schema]:
    content_part = {
        "type": "object",
        "required": ["type", "text"],
        "description": "text only: image_url, input_audio and file parts are refused (400 naming the part)",
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": _TEXT},
    }
    message = {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string", "enum": list(ROLES)},
            "content": _nullable(
                {
                    "anyOf": [_TEXT, {"type": "array", "items": _ref("ContentPart")}],
                    "description": "required, and not an empty list, except in an assistant message",
                }
            ),
            "tool_calls": _nullable(
                {"type": "array", "items": _ref("ToolCall"), "description": "an assistant message's tool calls"}
            ),
            "tool_call_id": _nullable(
                {"type": "string", "description": "role tool (required there): the id of the call it answers"}
            ),
        },
    }
    chat = {
        "type": "object",
        "required": ["model", "messages"],
        "description": f"At most {MAX_PROMPT_CHARS} characters of message text in all.",
        "properties": {
            **_sampling_properties(),
            "messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": _ref("ChatMessage")},
            "max_completion_tokens": _bounded("max_tokens", "integer"),
            "logprobs": _nullable({"type": "boolean"}),
            "top_logprobs": {
                **_bounded("top_logprobs", "integer"),
                "description": f"0 to {MAX_TOP_LOGPROBS}; needs logprobs: true",
            },
            "tools": _nullable({"type": "array", "maxItems": MAX_TOOLS, "items": _ref("Tool")}),
            "tool_choice": _nullable(_ref("ToolChoice")),
            "parallel_tool_calls": _nullable({"type": "boolean", "description": "false: at most one call"}),
            "functions": {"type": "null", "description": "deprecated by OpenAI, not supported: use tools"},
            "function_call": {"type": "null", "description": "deprecated by OpenAI, not supported: use tool_choice"},
            "audio": {"type": "null", "description": "audio output is not supported"},
            "modalities": _nullable({"type": "array", "items": {"type": "string", "enum": ["text"]}}),
            "web_search_options": {"type": "null", "description": "web search is not supported"},
            **{field: _refused(message) for field, message in CHAT_REFUSED.items() if field not in VLLM_REFUSED},
            "continue_final_message": {
                "type": "boolean",
                "default": False,
                "description": "the last message, the assistant's, is continued rather than answered (vLLM's)",
            },
            "add_generation_prompt": _nullable(
                {"type": "boolean", "description": "false only with continue_final_message, true only without it"}
            ),
        },
    }
    one_prompt = {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS}
    one_prompt_ids = {
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_TOKEN_IDS,
        "items": {"type": "integer", "minimum": 0, "maximum": INT32_MAX},
    }
    completion = {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            **_sampling_properties(),
            "prompt": {
                "anyOf": [
                    one_prompt,
                    {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": one_prompt},
                    one_prompt_ids,
                    {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": one_prompt_ids},
                ],
                "description": "text or token ids (of the model's vocabulary, passed as they are), one prompt or"
                f" up to {MAX_PROMPTS}",
            },
            "max_tokens": {
                **_nullable({"type": "integer", "minimum": 0, "maximum": SAMPLING_BOUNDS["max_tokens"].high}),
                "default": 16,
                "description": "at least 1 (null: 16); 0 only with echo (the prompt scored, nothing generated)",
            },
            "echo": {
                "type": "boolean",
                "default": False,
                "description": "each choice's text begins with its prompt; with logprobs, every prompt token's"
                " (the first's null) before the generated ones'. llama.cpp models only.",
            },
            "logprobs": _bounded("top_logprobs", "integer"),
            "suffix": _nullable({"type": "string", "maxLength": 0, "description": "not supported"}),
            "best_of": {**_bounded("n", "integer"), "description": "only equal to n (every choice is returned)"},
        },
    }
    embedding_input = {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS}
    embedding = {
        "type": "object",
        "required": ["model", "input"],
        "description": f"At most {MAX_PROMPT_CHARS} characters of input in all.",
        "properties": {
            "model": _sampling_properties()["model"],
            "input": {
                "anyOf": [embedding_input, {"type": "array", "minItems": 1, "maxItems": 2048, "items": embedding_input}]
            },
            "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
            "dimensions": {"type": "null", "description": "choosing the dimensions is not supported"},
            "user": _nullable({"type": "string"}),
        },
    }
    return {
        "ContentPart": content_part,
        "ChatMessage": message,
        "ChatCompletionRequest": chat,
        "CompletionRequest": completion,
        "EmbeddingRequest": embedding,
        **_response_format_schemas(),
        **_tool_schemas(),
        **_tokenizer_schemas(),
    }


def _tokenizer_schemas() -> dict[str, Schema]:
    """vLLM's and SGLang's /tokenize and /detokenize (edge.tokenize_protocol)."""
    model = _sampling_properties()["model"]
    text = {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            "model": model,
            "prompt": _TEXT,
            "add_special_tokens": _nullable({"type": "boolean", "enum": [True], "description": "only its default"}),
            "return_token_strs": _nullable({"type": "boolean", "enum": [False], "description": "not supported"}),
        },
    }
    chat = {
        "type": "object",
        "required": ["model", "messages"],
        "description": "taken and rendered with the model's chat template as a chat completion's messages and"
        " tools are (count is its usage.prompt_tokens); add_generation_prompt and continue_final_message are not"
        " both true",
        "properties": {
            "model": model,
            "messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": _ref("ChatMessage")},
            "tools": _nullable({"type": "array", "maxItems": MAX_TOOLS, "items": _ref("Tool")}),
            "tool_choice": _nullable(_ref("ToolChoice")),
            "parallel_tool_calls": _nullable({"type": "boolean", "description": "false: at most one call"}),
            "add_generation_prompt": _nullable({"type": "boolean", "default": True}),
            "continue_final_message": {"type": "boolean", "default": False},
            "add_special_tokens": _nullable({"type": "boolean", "enum": [False], "description": "only its default"}),
            "return_token_strs": _nullable({"type": "boolean", "enum": [False], "description": "not supported"}),
        },
    }
    detokenize = {
        "type": "object",
        "required": ["model", "tokens"],
        "properties": {
            "model": model,
            "tokens": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                "description": f"at most {MAX_TOKEN_IDS} token ids of the model's vocabulary (another id is a 400"
                " naming tokens)",
            },
        },
    }
    return {
        "TokenizeRequest": {"oneOf": [text, chat]},
        "DetokenizeRequest": detokenize,
        "TokenizeResponse": {
            "type": "object",
            "required": ["count", "max_model_len", "tokens"],
            "properties": {
                "count": {"type": "integer", "minimum": 0},
                "max_model_len": {"type": "integer", "minimum": 0},
                "tokens": {"type": "array", "items": {"type": "integer"}},
                "token_strs": {"type": "null"},
            },
        },
        "DetokenizeResponse": {
            "type": "object",
            "required": ["prompt"],
            "properties": {"prompt": {"type": "string"}},
        },
    }


def _response_schemas() -> dict[str, Schema]:
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        },
    }
    finish = {"type": "string", "enum": ["stop", "length", "tool_calls"]}
    # A call in a reply; in a chunk, the first part of a call (index, id, type, name), or a later one (index,
    # and the next piece of the arguments).
    call = {"type": "array", "items": _ref("ToolCall")}
    call_part = {
        "type": "object",
        "required": ["index", "function"],
        "properties": {
            "index": {"type": "integer", "minimum": 0},
            "id": {"type": "string"},
            "type": {"type": "string", "enum": ["function"]},
            "function": {
                "type": "object",
                "required": ["arguments"],
                "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
            },
        },
    }
    envelope = {
        "id": {"type": "string"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "system_fingerprint": {"type": "string"},
    }
    chat_choice = {
        "type": "object",
        "required": ["index", "message", "finish_reason"],
        "properties": {
            "index": {"type": "integer"},
            "message": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"type": "string", "enum": ["assistant"]},
                    "content": _nullable({"type": "string"}),
                    "tool_calls": call,
                },
            },
            "finish_reason": finish,
            "logprobs": _nullable({"type": "object"}),
        },
    }
    text_choice = {
        "type": "object",
        "required": ["index", "text", "finish_reason"],
        "properties": {
            "index": {"type": "integer"},
            "text": {"type": "string"},
            "finish_reason": finish,
            "logprobs": _nullable({"type": "object"}),
        },
    }
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string", "enum": ["invalid_request_error", "rate_limit_error", "server_error"]},
                    "param": _nullable({"type": "string"}),
                    "code": _nullable({"type": "string"}),
                },
            }
        },
    }
    return {
        "Usage": usage,
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                **envelope,
                "object": {"type": "string", "enum": ["chat.completion"]},
                "choices": {"type": "array", "items": chat_choice},
                "usage": _ref("Usage"),
            },
        },
        "Completion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                **envelope,
                "object": {"type": "string", "enum": ["text_completion"]},
                "choices": {"type": "array", "items": text_choice},
                "usage": _ref("Usage"),
            },
        },
        "ErrorResponse": error,
        "ChatCompletionChunk": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                **envelope,
                "object": {"type": "string", "enum": ["chat.completion.chunk"]},
                "choices": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "delta", "finish_reason"],
                        "properties": {
                            "index": {"type": "integer"},
                            "delta": {
                                "type": "object",
                                "properties": {
                                    "role": {"type": "string", "enum": ["assistant"]},
                                    "content": {"type": "string"},
                                    "tool_calls": {"type": "array", "items": call_part},
                                },
                            },
                            "finish_reason": _nullable(finish),
                            "logprobs": _nullable({"type": "object"}),
                        },
                    },
                },
                "usage": _ref("Usage"),
            },
        },
        "CompletionChunk": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                **envelope,
                "object": {"type": "string", "enum": ["text_completion"]},
                "choices": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "text", "finish_reason"],
                        "properties": {
                            "index": {"type": "integer"},
                            "text": {"type": "string"},
                            "finish_reason": _nullable(finish),
                            "logprobs": _nullable({"type": "object"}),
                        },
                    },
                },
                "usage": _ref("Usage"),
            },
        },
    }


def _responses_schemas() -> dict[str, Schema]:
    """OpenAI's Responses API as fleetlm serves it (edge.responses_protocol): the request's fields that
    change the answer, and the response's envelope; the items are described in words, as they follow
    OpenAI's."""
    text = _nullable({"type": "string"})
    request = {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "input": {
                "anyOf": [_TEXT, {"type": "array", "items": {"type": "object"}}],
                "description": "text, or items: messages (roles user, system, developer, assistant; text"
                " content), function_call and function_call_output; other items and non-text content are a"
                " 400 naming them",
            },
            "instructions": text,
            "max_output_tokens": _bounded("max_tokens", "integer"),
            "temperature": _bounded("temperature", "number"),
            "top_p": _bounded("top_p", "number"),
            "tools": _nullable({"type": "array", "items": {"type": "object"}, "description": "function tools only"}),
            "tool_choice": _nullable(
                {"anyOf": [{"type": "string", "enum": ["none", "auto", "required"]}, {"type": "object"}]}
            ),
            "parallel_tool_calls": _nullable({"type": "boolean"}),
            "text": _nullable({"type": "object", "description": "format: text, json_object or json_schema"}),
            "stream": {"type": "boolean", "default": False},
            "user": text,
            "metadata": _nullable({"type": "object"}),
            "store": _nullable({"type": "boolean", "description": "accepted; fleetlm keeps no responses"}),
            "previous_response_id": _nullable(
                {
                    "type": "string",
                    "description": "refused: fleetlm keeps no responses; send the whole conversation in input",
                }
            ),
            "include": _nullable({"type": "array", "items": {"type": "string"}}),
            "top_logprobs": {"enum": [None, 0], "description": "refused unless null or 0: use chat completions"},
            "truncation": _nullable(
                {"type": "string", "enum": ["disabled"], "description": "'auto' is refused: nothing is dropped"}
            ),
        },
    }
    response = {
        "type": "object",
        "required": ["id", "object", "created_at", "status", "model", "output"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["response"]},
            "created_at": {"type": "integer"},
            "status": {"type": "string", "enum": ["completed", "incomplete", "in_progress"]},
            "model": {"type": "string"},
            "output": {
                "type": "array",
                "items": {"type": "object"},
                "description": "a message with the text, then each function_call",
            },
            "usage": _nullable({"type": "object"}),
        },
    }
    event = {
        "type": "object",
        "required": ["type", "sequence_number"],
        "properties": {"type": {"type": "string"}, "sequence_number": {"type": "integer", "minimum": 0}},
        "description": "response.created, response.in_progress, response.output_item.added, ... then"
        " response.completed or response.incomplete; an error after the first event is an `error` event",
    }
    return {"ResponsesRequest": request, "Response": response, "ResponseStreamEvent": event}


def _sse_event(chunk: str) -> Schema:
    """One server-sent event of a stream (OpenAPI 3.1: the schema of an event-stream describes each event):
    its data is a chunk or an error as JSON, or the closing `[DONE]`."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"type": "string", "enum": ["[DONE]"]},
                    {
                        "type": "string",
                        "contentMediaType": JSON,
                        "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorResponse")]},
                    },
                ]
            }
        },
    }


_SSE = (
    "With `stream: true`: server-sent events, one `data: {json}` per chunk (`chat.completion.chunk` /"
    " `text_completion` objects with `choices[].delta` or `choices[].text`), a final chunk with `usage` when"
    " `stream_options.include_usage` is set, then `data: [DONE]`. An error after the stream has started is one"
    ' `data: {"error": {...}}` event (the ErrorResponse shape), then `data: [DONE]`.'
)


def _errors() -> dict[str, Any]:
    limits = HttpLimits()
    reasons = {
        "400": "invalid request: the body is not JSON, or a field has the wrong type or is out of range (`param`)",
        "404": "the model does not exist (model_not_found)",
        "405": "the route takes POST",
        "408": f"the body did not arrive within {limits.body_timeout_seconds:g} s (REQUEST_TIMEOUT)",
        "413": f"the body is larger than {limits.max_body_bytes} bytes (REQUEST_TOO_LARGE)",
        "429": "the model's replicas are full; see Retry-After (NO_CAPACITY, GPU_OVERLOADED)",
        "499": "the client went away",
        "500": "a bug; the edge's log has the request id (INTERNAL)",
        "503": "no replica can serve the model now (MODEL_UNAVAILABLE, BACKEND_UNAVAILABLE)",
        "504": "the node did not answer in time (BACKEND_TIMEOUT)",
    }
    return {
        code: {"description": why, "content": {JSON: {"schema": _ref("ErrorResponse")}}}
        for code, why in reasons.items()
    }


def _operation(summary: str, request: str, response: str, chunk: str = "") -> Schema:
    return {
        "summary": summary,
        "operationId": request.removesuffix("Request").lower(),
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref(request)}}},
        "responses": {
            "200": {
                "description": f"the {response}; {_SSE}" if chunk else f"the {response}",
                "content": {
                    JSON: {"schema": _ref(response) if response != "embeddings" else {"type": "object"}},
                    **({"text/event-stream": {"schema": _sse_event(chunk)}} if chunk else {}),
                },
            },
            **_errors(),
        },
    }


_KEY_ERRORS = {
    "401": "no API key, or one that is unknown, revoked or expired (invalid_api_key)",
    "403": "the API key may not use this model (model_not_allowed)",
}
_BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "an API key of the fleet (`fleetlm keys create`); sent as `Authorization: Bearer <key>`",
}


def describe(app: FastAPI, requires_key: bool = False) -> None:
    """Make `app.openapi()` (GET /openapi.json, /docs) describe the generation routes and the bodies of the
    routes that read them themselves, with the error responses every route can give. An edge that requires
    API keys says so: the OpenAI routes (/v1/...) need a bearer key and may answer 401/403; /health, /metrics
    and the document itself stay open."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(_request_schemas())
        schemas.update(_response_schemas())
        schemas.update(_responses_schemas())
        paths = document.setdefault("paths", {})
        paths["/v1/chat/completions"] = {
            "post": _operation(
                "Create a chat completion", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"
            )
        }
        paths["/v1/completions"] = {
            "post": _operation("Create a completion", "CompletionRequest", "Completion", "CompletionChunk")
        }
        responses = _operation("Create a response (OpenAI's Responses API)", "ResponsesRequest", "Response")
        responses["responses"]["200"]["description"] = "the Response; with stream, its typed server-sent events"
        responses["responses"]["200"]["content"]["text/event-stream"] = {
            "schema": {"type": "object", "properties": {"event": {"type": "string"}, "data": {
                "type": "string", "contentMediaType": JSON, "contentSchema": _ref("ResponseStreamEvent")}}}
        }  # fmt: skip
        paths["/v1/responses"] = {"post": responses}
        embeddings = paths.get("/v1/embeddings", {}).get("post")
        if embeddings is not None:
            embeddings.update(_operation("Create embeddings", "EmbeddingRequest", "embeddings"))
        for path, summary, name in (
            ("/tokenize", "Tokenize a prompt or a conversation (vLLM's shape)", "Tokenize"),
            ("/detokenize", "The text of token ids (vLLM's shape)", "Detokenize"),
        ):
            route = paths.get(path, {}).get("post")
            if route is not None:
                route.update(_operation(summary, f"{name}Request", f"{name}Response"))
        model = paths.get("/v1/models/{model_id}", {}).get("get")
        if model is not None:
            model["responses"]["404"] = _errors()["404"]
        for item in paths.values():
            for operation in item.values():
                # FleetError's answers are OpenAI's error body, whatever the route.
                for code, response in _errors().items():
                    if code in {"500", "503"}:
                        operation.setdefault("responses", {}).setdefault(code, response)
                operation.get("responses", {}).pop("422", None)  # FastAPI's validation error: never sent
        if requires_key:
            document["components"]["securitySchemes"] = {"apiKey": _BEARER}
            for path, item in paths.items():
                if not needs_key(path):
                    continue
                for operation in item.values():
                    operation["security"] = [{"apiKey": []}]
                    for code, why in _KEY_ERRORS.items():
                        content = {JSON: {"schema": _ref("ErrorResponse")}}
                        operation.setdefault("responses", {})[code] = {"description": why, "content": content}
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
