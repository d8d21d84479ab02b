"""Several prompts in one completions request (OpenAI's `prompt` as a list of strings), with the official
openai client through a real edge and node: choice i * n + j is prompt i's choice j, each the same text as
that prompt asked alone (greedy), usage the sum of theirs; streamed, every choice's text and one finish
each; more prompts than run at once (edge.prompt_batch.WINDOW); one prompt the node refuses fails the
request and leaves nothing running."""

from __future__ import annotations

import collections

import httpx
import openai
import pytest

from edge.prompt_batch import WINDOW
from tests.cluster import wait_for
from tests.conftest import Mesh

pytestmark = [pytest.mark.model, pytest.mark.cluster]

PROMPTS = ["The capital of France is", "Water boils at", "The three primary colors are"]


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.http}/v1", api_key="unused", max_retries=0, timeout=120)


def alone(client: openai.OpenAI, mesh: Mesh, prompt: str, tokens: int = 12) -> openai.types.Completion:
    return client.completions.create(model=mesh.model, prompt=prompt, max_tokens=tokens, temperature=0)


def test_each_prompt_gets_its_choices_in_order_and_usage_adds_up(client: openai.OpenAI, mesh: Mesh) -> None:
    singles = [alone(client, mesh, prompt) for prompt in PROMPTS]
    reply = client.completions.create(model=mesh.model, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [s.choices[0].text for s in singles]
    assert [c.finish_reason for c in reply.choices] == [s.choices[0].finish_reason for s in singles]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles if s.usage)
    assert reply.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles if s.usage)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_n_choices_of_each_prompt_are_numbered_prompt_by_prompt(client: openai.OpenAI, mesh: Mesh) -> None:
    singles = [alone(client, mesh, prompt, 8) for prompt in PROMPTS[:2]]
    reply = client.completions.create(model=mesh.model, prompt=PROMPTS[:2], n=2, max_tokens=8, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    # At temperature 0 every choice of a prompt is its greedy answer.
    assert [c.text for c in reply.choices] == [singles[i].choices[0].text for i in (0, 0, 1, 1)]


def test_streamed_every_choice_has_its_text_and_one_finish(client: openai.OpenAI, mesh: Mesh) -> None:
    whole = client.completions.create(model=mesh.model, prompt=PROMPTS, max_tokens=12, temperature=0)
    texts: dict[int, str] = collections.defaultdict(str)
    finishes: collections.Counter[int] = collections.Counter()
    usage = None
    for chunk in client.completions.create(
        model=mesh.model,
        prompt=PROMPTS,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finishes[choice.index] += choice.finish_reason is not None
        usage = chunk.usage or usage
    assert dict(texts) == {c.index: c.text for c in whole.choices}
    assert finishes == {0: 1, 1: 1, 2: 1}
    assert usage is not None and whole.usage is not None and usage.total_tokens == whole.usage.total_tokens


def test_more_prompts_than_run_at_once_are_all_answered(client: openai.OpenAI, mesh: Mesh) -> None:
    prompts = [f"Item {i}: the number after {i} is" for i in range(WINDOW + 4)]
    reply = client.completions.create(model=mesh.model, prompt=prompts, max_tokens=4, temperature=0)
    assert [c.index for c in reply.choices] == list(range(len(prompts)))
    assert all(c.text and c.finish_reason == "length" for c in reply.choices)
    assert reply.usage is not None and reply.usage.completion_tokens == 4 * len(prompts)


def test_a_prompt_the_node_refuses_fails_the_request_and_cancels_the_others(client: openai.OpenAI, mesh: Mesh) -> None:
    too_long = "hello " * 3000  # past the 2048-token context: the node refuses it, not the edge
    with pytest.raises(openai.BadRequestError) as caught:
        # the two others could run for 1,500 tokens (~20 s here) were they not cancelled
        client.completions.create(model=mesh.model, prompt=[PROMPTS[0], too_long, PROMPTS[1]], max_tokens=1500)
    assert caught.value.code == "context_length_exceeded", caught.value
    assert "maximum context length" in str(caught.value)  # OpenAI's words, which error mappers look for
    metrics = mesh.cluster.metrics[next(iter(k for k in mesh.cluster.metrics if k != "controlplane"))]

    def idle() -> bool:
        text = httpx.get(metrics, timeout=5).text
        running = [line for line in text.splitlines() if line.startswith("fleetlm_node_requests_running{")]
        return bool(running) and all(line.endswith(" 0.0") for line in running)

    wait_for(idle, 5, "the other prompts to be cancelled on the node")
