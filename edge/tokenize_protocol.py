"""The HTTP shapes of `POST /tokenize` and `POST /detokenize`, as vLLM and SGLang serve them beside the
OpenAI API, and their translation to the InferenceService's Tokenize and Detokenize.

    /tokenize    {"model", "prompt"}
                 or {"model", "messages", "tools", "tool_choice", "parallel_tool_calls", "add_generation_prompt",
                     "continue_final_message"}
                 -> {"count", "max_model_len", "tokens", "token_strs": null}
    /detokenize  {"model", "tokens"} -> {"prompt"}

A conversation (its messages with their tool calls and tool results, and the tools offered) is taken,
checked and rendered with the model's chat template exactly as a chat completion's (ChatCompletionRequest
reads it), so `count` is the `usage.prompt_tokens` the same messages and tools get from
/v1/chat/completions, and what gRPC's Tokenize counts for the same ChatConversation. Options vLLM has
that fleetlm does not implement are refused by name when they would change the answer
(`add_special_tokens` other than its default, `return_token_strs`), never ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ModelWrapValidatorHandler, PrivateAttr, model_validator

from edge.openai_protocol import ChatCompletionRequest
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import FleetError, invalid
from mesh.inference_requests import check_prompt_chars, validate_detokenize

# The proto's field names in errors from the node, as this API calls them.
_HTTP_PARAMS = {"text": "prompt", "chat": "messages", "token_ids": "tokens"}


def renamed(error: FleetError) -> FleetError:
    """A node's error about a Tokenize/Detokenize field, naming the field of this API instead."""
    param = _HTTP_PARAMS.get(error.param or "")
    return error if param is None else dataclasses.replace(error, param=param)


# A conversation's fields: a chat completion's, read, checked and converted to the proto's ChatConversation by
# ChatCompletionRequest, so that a conversation is rendered as a chat completion renders it. A `prompt` refuses
# them by name (continue_final_message at its default, false, asks nothing).
CHAT_FIELDS = ("messages", "tools", "tool_choice", "parallel_tool_calls", "continue_final_message")


class TokenizeBody(BaseModel):
    """vLLM's TokenizeCompletionRequest (`prompt`) or TokenizeChatRequest (`messages`, and `tools` beside them),
    in one model."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None  # each one a chat completion's (CHAT_FIELDS)
    add_generation_prompt: bool | None = None  # the TokenizeRequest's, not the conversation's
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = None
    _chat: ChatCompletionRequest | None = PrivateAttr(default=None)  # CHAT_FIELDS, with `messages`

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise invalid("prompt", "a tokenize request needs either 'prompt' or 'messages'")
        if self.return_token_strs:
            raise invalid("return_token_strs", "return_token_strs is not supported")
        # vLLM's defaults: special tokens (BOS) added to a prompt; a chat template writes its own.
        if self.add_special_tokens is not None and self.add_special_tokens != (self.prompt is not None):
            raise invalid("add_special_tokens", "add_special_tokens can only be left at its default here")
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _conversation(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        """A conversation read as a chat completion's (its errors name the same fields), after this model's own
        checks (which of `prompt` and `messages`)."""
        body = handler(data)
        if not isinstance(data, dict):
            return body
        if body.prompt is not None:
            for param in ("add_generation_prompt", *CHAT_FIELDS):
                value = data.get(param)
                if value is not None and not (param == "continue_final_message" and value is False):
                    raise invalid(param, f"'{param}' applies to 'messages', not to a 'prompt'")
            return body
        body._chat = ChatCompletionRequest.model_validate({k: data[k] for k in CHAT_FIELDS if k in data})
        return body

    def to_proto(self) -> inference_pb2.TokenizeRequest:
        request = inference_pb2.TokenizeRequest(model=self.model or "")
        if self._chat is None:
            assert self.prompt is not None  # _one_input
            check_prompt_chars("prompt", (self.prompt,))
            request.text = self.prompt
            return request
        request.chat.CopyFrom(self._chat.chat())
        if self.add_generation_prompt is not None:
            request.add_generation_prompt = self.add_generation_prompt
        return request


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[int]

    def to_proto(self) -> inference_pb2.DetokenizeRequest:
        for i, token in enumerate(self.tokens):
            if token >= 2**31:  # beyond the proto's int32 (a negative id within it is validate_detokenize's)
                raise invalid("tokens", f"token {i} is {token}; larger than any token id")
            if token < -(2**31):
                raise invalid("tokens", f"token {i} is {token}; token ids are 0 or more")
        request = inference_pb2.DetokenizeRequest(model=self.model or "", token_ids=self.tokens)
        try:
            validate_detokenize(request)
        except FleetError as error:
            raise renamed(error) from None
        return request


def tokenize_json(response: inference_pb2.TokenizeResponse) -> dict[str, Any]:
    tokens = list(response.token_ids)
    return {"count": len(tokens), "max_model_len": response.context_size, "tokens": tokens, "token_strs": None}


def detokenize_json(response: inference_pb2.DetokenizeResponse) -> dict[str, Any]:
    return {"prompt": response.text}
