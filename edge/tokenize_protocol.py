"""The HTTP shapes of `POST /tokenize` and `POST /detokenize`, as vLLM and SGLang serve them beside the
OpenAI API, and their translation to the InferenceService's Tokenize and Detokenize.

    /tokenize    {"model", "prompt"} or {"model", "messages", "add_generation_prompt", "continue_final_message"}
                 -> {"count", "max_model_len", "tokens", "token_strs": null}
    /detokenize  {"model", "tokens"} -> {"prompt"}

A conversation is rendered with the model's chat template exactly as a chat completion renders it, so
`count` is the `usage.prompt_tokens` the same messages get from /v1/chat/completions. Options vLLM has
that fleetlm does not implement are refused by name when they would change the answer
(`add_special_tokens` other than its default, `return_token_strs`), never ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, model_validator

from edge.openai_protocol import ChatMessageIn, TextOnlyMessages
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import FleetError, invalid
from mesh.inference_requests import check_prompt_chars, validate_detokenize

# The proto's field names in errors from the node, as this API calls them.
_HTTP_PARAMS = {"text": "prompt", "chat": "messages", "token_ids": "tokens"}


def renamed(error: FleetError) -> FleetError:
    """A node's error about a Tokenize/Detokenize field, naming the field of this API instead."""
    param = _HTTP_PARAMS.get(error.param or "")
    return error if param is None else dataclasses.replace(error, param=param)


class TokenizeBody(TextOnlyMessages):
    """vLLM's TokenizeCompletionRequest (`prompt`) or TokenizeChatRequest (`messages`), in one model."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = None

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise invalid("prompt", "a tokenize request needs either 'prompt' or 'messages'")
        if self.return_token_strs:
            raise invalid("return_token_strs", "return_token_strs is not supported")
        # vLLM's defaults: special tokens (BOS) added to a prompt; a chat template writes its own.
        if self.add_special_tokens is not None and self.add_special_tokens != (self.prompt is not None):
            raise invalid("add_special_tokens", "add_special_tokens can only be left at its default here")
        if self.prompt is not None and (self.add_generation_prompt is not None or self.continue_final_message):
            param = "continue_final_message" if self.continue_final_message else "add_generation_prompt"
            raise invalid(param, f"'{param}' applies to 'messages', not to a 'prompt'")
        return self

    def to_proto(self) -> inference_pb2.TokenizeRequest:
        request = inference_pb2.TokenizeRequest(model=self.model or "")
        if self.prompt is not None:
            check_prompt_chars("prompt", (self.prompt,))
            request.text = self.prompt
            return request
        assert self.messages is not None  # _one_input
        request.chat.CopyFrom(
            inference_pb2.ChatConversation(
                messages=[inference_pb2.ChatMessage(role=m.role, content=m.text()) for m in self.messages],
                continue_final_message=self.continue_final_message,
            )
        )
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
