"""An OpenAI-compatible server the agent starts and supervises as a child process: SGLang, or any
server a deployment names in `command` (vLLM, llama.cpp's llama-server, llama_cpp.server).

Start: the process (supervisor.EngineProcess), then its readiness URL, then the OpenAI client on top.
A start that fails or is cancelled (the replica was unloaded while its engine was loading) stops the
process. A crash is reported by `watch` with the process's last line (its last lines go to the log); the
host then fails the replica and starts it again with backoff. Close: the client, then the process
(SIGTERM, then SIGKILL).

A secret flag's value (`--api-key K`) reaches the process and the client, never a log line or an error:
the command line is logged redacted, and the value is cut from the output the process prints.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import httpx

from fleetlm.controlplane.v1 import node_pb2
from mesh.redaction import REDACTED, redact_argv
from node_agent.engines.base import (
    Embeddings,
    EngineInfo,
    EngineLoad,
    GenerationEvent,
    Prompt,
    SamplingOptions,
    Tally,
)
from node_agent.engines.openai_server import OpenAIServerConfig, OpenAIServerEngine
from node_agent.engines.supervisor import EngineProcess


@dataclass(frozen=True)
class Launch:
    name: str  # for logs and reasons: "SGLang", "engine server"
    argv: Sequence[str]
    port: int
    env: Mapping[str, str] | None = None
    ready_path: str = "/v1/models"  # answers 200 once the model is loaded
    startup_timeout: float = 300.0
    stop_grace: float = 15.0


def command_launch(spec: node_pb2.ModelSpec, port: int) -> Launch:
    """A deployment's own server command (engine "openai" with `command`): {port} and {path} filled in,
    engine_args appended as flags."""
    argv = [part.replace("{port}", str(port)).replace("{path}", spec.path) for part in spec.command]
    for name in sorted(spec.engine_args):
        value = spec.engine_args[name]
        if value.lower() != "false":
            argv += [f"--{name.lstrip('-')}", *([value] if value else [])]
    timeout = spec.startup_timeout.ToTimedelta().total_seconds() if spec.HasField("startup_timeout") else 0
    return Launch(name=f"{spec.command[0]} ({spec.name})", argv=argv, port=port, startup_timeout=timeout or 300.0)


def secret_values(argv: Sequence[str]) -> list[str]:
    """The values in a command line that redact_argv hides (`--api-key K`, `--api-key=K`)."""
    values = []
    for original, shown in zip(argv, redact_argv(argv), strict=True):
        if original != shown:
            values.append(original.split("=", 1)[1] if shown.endswith(f"={REDACTED}") else original)
    return values


class LaunchedServerEngine:
    def __init__(self, launch: Launch, client: OpenAIServerConfig) -> None:
        self.launch = launch
        self.process = EngineProcess(launch.name, launch.argv, launch.env, secrets=secret_values(launch.argv))
        self.client = OpenAIServerEngine(client)
        self._url = f"http://127.0.0.1:{launch.port}"
        # A server started with an API key asks for it on its readiness URL too (llama_cpp.server does).
        self._probe_headers = {"Authorization": f"Bearer {client.api_key}"} if client.api_key else {}

    @property
    def load(self) -> EngineLoad:
        return self.client.load

    async def _ready(self) -> bool:
        async with httpx.AsyncClient(timeout=2.0, headers=self._probe_headers) as probe:
            reply = await probe.get(f"{self._url}{self.launch.ready_path}")
        return reply.status_code == 200

    async def start(self) -> EngineInfo:
        try:
            await self.process.start(self._ready, self.launch.startup_timeout)
            return await self.client.start()
        except BaseException:
            await asyncio.shield(self.close())
            raise

    async def close(self) -> None:
        await self.client.close()
        await self.process.stop(self.launch.stop_grace)

    async def watch(self) -> str:
        crashed = asyncio.ensure_future(self.process.exited())
        unhealthy = asyncio.ensure_future(self.client.watch())
        try:
            done, _ = await asyncio.wait({crashed, unhealthy}, return_when=asyncio.FIRST_COMPLETED)
            return (crashed if crashed in done else unhealthy).result()
        finally:
            crashed.cancel()
            unhealthy.cancel()

    async def tokenize(self, prompt: Prompt) -> list[int]:
        return await self.client.tokenize(prompt)

    async def detokenize(self, tokens: Sequence[int]) -> str:
        return await self.client.detokenize(tokens)

    def generate(
        self, prompt: Prompt, options: SamplingOptions, tally: Tally | None = None
    ) -> AsyncIterator[GenerationEvent]:
        return self.client.generate(prompt, options, tally)

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        return await self.client.embed(texts)
