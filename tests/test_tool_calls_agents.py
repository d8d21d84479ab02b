"""A tool-calling loop run by a real agent framework, OpenAI's Agents SDK (`openai-agents` from PyPI, on its
Chat Completions model), against the fleet with the default model: the model calls a Python function, the
framework runs it and sends its result back as a `tool` message, and the model answers, streamed and not.

The agent asks for one call on its first turn (tool_choice "required", parallel_tool_calls false:
SmolLM2-135M does not call tools of its own accord, and greedy with parallel calls allowed it calls again
and again); the SDK then resets tool_choice (its `reset_tool_choice`), so the next turn is free to answer
in text."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.items import MessageOutputItem, ToolCallItem, ToolCallOutputItem
from openai import AsyncOpenAI

from tests.conftest import Mesh

pytestmark = [pytest.mark.model, pytest.mark.cluster]

REPORT = "It is 31 degrees and sunny in {city}."


@pytest.fixture(autouse=True)
def no_tracing() -> Iterator[None]:
    set_tracing_disabled(True)  # the SDK would export traces to OpenAI's servers
    yield


def weather_agent(mesh: Mesh, cities: list[str]) -> Agent[Any]:
    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city.

        Args:
            city: The city's name.
        """
        cities.append(city)
        return REPORT.format(city=city)

    client = AsyncOpenAI(base_url=f"{mesh.http}/v1", api_key="unused", max_retries=0, timeout=120)
    return Agent(
        name="weather",
        instructions="You answer questions about the weather. Use the get_weather tool.",
        tools=[get_weather],
        model=OpenAIChatCompletionsModel(model=mesh.model, openai_client=client),
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=120),
    )


def check_loop(items: list[Any], cities: list[str], final_output: Any) -> None:
    """The run went model -> tool call -> the Python function -> its result back to the model -> an answer."""
    calls = [i for i in items if isinstance(i, ToolCallItem)]
    outputs = [i for i in items if isinstance(i, ToolCallOutputItem)]
    assert calls and len(outputs) == len(calls) == len(cities), items
    assert all(getattr(c.raw_item, "name", None) == "get_weather" for c in calls)
    assert [o.output for o in outputs] == [REPORT.format(city=city) for city in cities]
    assert all(isinstance(city, str) and city for city in cities)  # the grammar gave the argument its type
    assert isinstance(items[-1], MessageOutputItem)  # the model answered after the results
    assert isinstance(final_output, str) and final_output.strip()


async def test_an_agent_calls_a_python_function_and_answers(mesh: Mesh) -> None:
    cities: list[str] = []
    result = await Runner.run(weather_agent(mesh, cities), "What is the weather in Paris?", max_turns=4)
    check_loop(result.new_items, cities, result.final_output)
    # The result went back as a tool message answering the call's id.
    sent = result.to_input_list()
    outputs = [m for m in sent if isinstance(m, dict) and m.get("type") == "function_call_output"]
    call_ids = [m["call_id"] for m in sent if isinstance(m, dict) and m.get("type") == "function_call"]
    assert outputs and [o["call_id"] for o in outputs] == call_ids and call_ids[0].startswith("call_")


async def test_a_streamed_agent_run_calls_the_function_and_answers(mesh: Mesh) -> None:
    cities: list[str] = []
    result = Runner.run_streamed(weather_agent(mesh, cities), "What is the weather in Rome?", max_turns=4)
    kinds = []
    async for event in result.stream_events():
        if event.type == "run_item_stream_event":
            kinds.append(event.name)
    assert kinds.index("tool_called") < kinds.index("tool_output") < kinds.index("message_output_created"), kinds
    check_loop(result.new_items, cities, result.final_output)
