"""The engine protocol: what the node agent needs from anything that runs a model.

Transport-free: no gRPC or HTTP types here, so engines are testable alone and the servicer stays thin.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True)
class ToolCall:
    """A call of a function: its id (`call_...`), the function's name and its arguments as JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str = ""  # a "tool" turn: the call it answers


@dataclass(frozen=True)
class Function:
    """A tool the model may call. `parameters` is the JSON schema of its arguments as text ("" for none)."""

    name: str
    description: str = ""
    parameters: str = ""
    strict: bool = False


@dataclass(frozen=True)
class ToolChoice:
    """OpenAI's tool_choice: "none", "auto", "required", or "function" with the function's name."""

    mode: Literal["none", "auto", "required", "function"] = "auto"
    function: str = ""


@dataclass(frozen=True)
class Chat:
    """A conversation the engine formats with the model's chat template. With `continue_final_message`
    the last message is an assistant turn the model goes on with (no end-of-turn after its text and no
    new generation prompt); the caller checks that its role is "assistant". Without
    `add_generation_prompt` (tokenizing only) the conversation ends after its last turn, with no
    assistant turn started. With `tools` (and a tool_choice other than "none") the model may call them:
    its calls come as ToolCallChunk events."""

    messages: tuple[Message, ...]
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    tools: tuple[Function, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True

    @property
    def calls_tools(self) -> bool:
        """Whether the model may call tools in this reply."""
        return bool(self.tools) and self.tool_choice.mode != "none"


@dataclass(frozen=True)
class ResponseFormat:
    """The output must be a JSON document: any object (`json_object`), or one valid against `schema`, a JSON
    schema's text (`json_schema`). Engines that cannot enforce a schema raise InvalidInput naming
    `response_format`, never ignore it."""

    kind: Literal["json_object", "json_schema"]
    schema: str = ""
    name: str = ""
    description: str = ""
    strict: bool = False


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stops: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False  # report each generated token's log probability
    top_logprobs: int = 0  # and this many alternatives at each position
    response_format: ResponseFormat | None = None  # None: free text
    n: int = 1  # choices: sequences sampled from the one prompt (choice i seeded with seed + i)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), ids in order
    # A raw prompt echoed (OpenAI's completions `echo`): the stream begins with a PromptEcho, and
    # max_tokens may be 0 (the prompt scored, nothing generated). Engines that cannot raise InvalidInput.
    echo: bool = False


@dataclass(frozen=True)
class TopLogprob:
    token: str
    token_bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log probability under the model's raw distribution, the most likely
    alternatives, and where its text starts in the output (in characters)."""

    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()
    text_offset: int = 0


@dataclass(frozen=True)
class TextChunk:
    text: str
    # With SamplingOptions.logprobs: the tokens whose text starts in this chunk.
    logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0  # the choice (SamplingOptions.n)


@dataclass(frozen=True)
class PromptEcho:
    """With SamplingOptions.echo, the stream's first event. With SamplingOptions.logprobs: every token of the
    prompt as the model reads it (a beginning-of-text token included), each with its log probability given
    the tokens before it and top_logprobs alternatives, text_offset in the prompt's text; the first has no
    tokens before it, so its logprob is NaN and it has no alternatives. Empty without logprobs."""

    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ChoiceEnd:
    """With n > 1: one choice has ended. Every choice ends with one, before the request's Finished."""

    index: int
    reason: Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class ToolCallChunk:
    """Part of a tool call the model is writing, as OpenAI streams `delta.tool_calls`: the first chunk of a
    call has its index, id and name; the later ones the same index and the next piece of its arguments."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class Finished:
    """The end of a request: why (with n > 1 the first choice's reason), the prompt's tokens counted once
    and the tokens generated by every choice."""

    reason: Literal["stop", "length", "tool_calls"]
    prompt_tokens: int
    completion_tokens: int
    tool_calls: tuple[ToolCall, ...] = ()  # every call of the reply, complete (as streamed)


@dataclass
class Tally:
    """The tokens an engine has spent on one request so far, kept current as it works (from another thread,
    maybe: a reader may be a token behind): the prompt's once the engine takes the request on (those its
    prefix cache held included, as a Finished counts them), and the tokens every choice has generated. A
    request that ends before its Finished (its caller went away) is counted from it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class TokenPrompt:
    """A raw prompt as token ids of the model's vocabulary, passed as they are (nothing added). An engine
    raises InvalidInput naming `prompt` for an id the model does not have."""

    ids: tuple[int, ...]


GenerationEvent = PromptEcho | TextChunk | ToolCallChunk | ChoiceEnd | Finished
# What to complete: a raw prompt (text or token ids), or a conversation the engine formats with the model's
# chat template.
Prompt = str | TokenPrompt | Chat


@dataclass
class EngineLoad:
    """The load signal reported to the scheduler."""

    running: int = 0
    queued: int = 0


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass
class EngineInfo:
    context_size: int


class EngineError(Exception):
    """A failure the engine can explain in one line (shown to operators and clients). On its own it is
    one the engine may recover from (a server that is down, a crash, a start-up that timed out): the
    host tries the replica again with backoff."""


class PermanentEngineError(EngineError):
    """A configuration error that trying again cannot fix: a missing weights file, weights the engine
    cannot run, SGLang on a node without an NVIDIA GPU, an `openai` engine with neither URL nor command.
    The host stops retrying the replica; a new deployment or the next delivery of its assignment tries it
    again, once the operator has fixed the cause."""


class ContextLengthExceeded(EngineError):
    """The request does not fit the model's context. `param` names the field to change."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_context(prompt_tokens: int, context: int, max_tokens: int | None) -> None:
    """ContextLengthExceeded when a prompt of `prompt_tokens` tokens, or it and `max_tokens` more, does not
    fit a context of `context` tokens (param `messages` for the prompt, which the node renames for a
    completion, or `max_tokens`)."""
    if prompt_tokens >= context:
        raise ContextLengthExceeded(
            f"the prompt is {prompt_tokens} tokens; this model's maximum context length is {context} tokens",
            param="messages",
        )
    if max_tokens is not None and prompt_tokens + max_tokens > context:
        raise ContextLengthExceeded(
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds this model's maximum"
            f" context length of {context} tokens",
            param="max_tokens",
        )


# Tokens a chat template may add around each message (role markers), and around the whole conversation.
_TEMPLATE_TOKENS_PER_MESSAGE = 16
_TEMPLATE_TOKENS = 64


def may_exceed(prompt: Prompt, context: int, max_tokens: int | None) -> bool:
    """Whether `prompt` could fail `check_context`, without tokenizing it: False when it would fit even at one
    token per byte of its text (a byte-level vocabulary never gives more), with room for a chat template's
    markers. A conversation with tools may (its template may add any amount of text for them)."""
    room = context - (max_tokens or 0)
    if isinstance(prompt, TokenPrompt):
        return len(prompt.ids) >= room
    if isinstance(prompt, str):
        return len(prompt.encode()) + 2 >= room  # BOS, EOS
    if prompt.tools:
        return True
    text = sum(len(m.content.encode()) + sum(len(str(c)) for c in m.tool_calls) for m in prompt.messages)
    return text + _TEMPLATE_TOKENS_PER_MESSAGE * len(prompt.messages) + _TEMPLATE_TOKENS >= room


class EngineUnavailable(EngineError):
    """The engine cannot serve now (its server is unreachable, crashed or overloaded); another replica may."""


class InvalidInput(EngineError):
    """The request is outside the engine's limits. `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class Engine(Protocol):
    """One loaded model. Implementations never block the event loop."""

    @property
    def load(self) -> EngineLoad:
        """Requests running and waiting now."""
        ...

    async def start(self) -> EngineInfo:
        """Load the model; raises EngineError (PermanentEngineError when retrying cannot help) with a
        readable reason if it cannot. A start that fails or is cancelled leaves no process behind."""
        ...

    async def close(self) -> None:
        """Free the model and stop its process, whatever state start() reached; safe to call twice."""
        ...

    async def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt as generation would see it (chat template applied, special tokens
        parsed, BOS added)."""
        ...

    async def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of token ids, special tokens written out; InvalidInput naming `tokens` for an id
        outside the vocabulary."""
        ...

    def generate(
        self, prompt: Prompt, options: SamplingOptions, tally: Tally | None = None
    ) -> AsyncIterator[GenerationEvent]:
        """Stream text chunks, then one Finished (with options.echo, a PromptEcho first). With options.n > 1:
        the chunks of every choice, each with its index, interleaved, one ChoiceEnd per choice as it ends,
        then one Finished. Closing the iterator early stops the generation (of every choice). `tally`, when
        given, is kept current with the tokens spent so far (as exactly as the engine knows them)."""
        ...

    async def embed(self, texts: Sequence[str]) -> Embeddings: ...

    async def watch(self) -> str:
        """Return, with the reason, when the engine stops working on its own (its process crashed, its
        server stopped answering). An engine that cannot fail that way never returns."""
        ...
