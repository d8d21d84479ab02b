"""Continuous batching in the llama.cpp engine, with the real model: batched equals alone, cancelling one
sequence leaves the others alone, OpenAI sampling semantics, prefix reuse and the queue."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from launcher.default_model import default_model_path
from node_agent.engines.base import Finished, SamplingOptions, TextChunk, TokenLogprob
from node_agent.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from node_agent.engines.llamacpp_batch import BatchRequest, seed32
from tests.model_engine import default_model_engine

pytestmark = [pytest.mark.model]

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "My favourite book is",
    "In 1969, astronauts",
    "A recipe for pancakes:",
]
GREEDY = SamplingOptions(max_tokens=32, temperature=0)


@pytest_asyncio.fixture(scope="module")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    async with default_model_engine(8) as built:
        yield built


async def run(engine: LlamaCppEngine, prompt: str, options: SamplingOptions = GREEDY) -> tuple[str, Finished]:
    parts: list[str] = []
    async for event in engine.generate(prompt, options):
        if isinstance(event, TextChunk):
            parts.append(event.text)
        else:
            return "".join(parts), event
    raise AssertionError("no Finished event")


async def test_batch_of_eight_equals_each_alone(engine: LlamaCppEngine) -> None:
    alone = [await run(engine, p) for p in PROMPTS]
    steps_before = engine.stats.steps  # type: ignore[union-attr]
    together = await asyncio.gather(*(run(engine, p) for p in PROMPTS))
    steps = engine.stats.steps - steps_before  # type: ignore[union-attr]
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert [f.completion_tokens for _, f in together] == [f.completion_tokens for _, f in alone]
    # They really were decoded together: far fewer steps than 8 sequences one after another.
    assert steps < sum(f.completion_tokens for _, f in alone) / 2


async def test_greedy_by_argmax_equals_llama_cpps_greedy_sampler(engine: LlamaCppEngine) -> None:
    # A bias of 0 changes no logit but puts llama.cpp's logit-bias sampler before its greedy one, so those
    # requests go through llama_sampler_sample; plain greedy ones take the argmax themselves.
    through_chain = SamplingOptions(max_tokens=32, temperature=0, logit_bias=((0, 0.0),))
    stats = engine.stats
    assert stats is not None
    before = stats.argmax_tokens
    by_chain = await asyncio.gather(*(run(engine, p, through_chain) for p in PROMPTS))
    assert stats.argmax_tokens == before
    by_argmax = await asyncio.gather(*(run(engine, p) for p in PROMPTS))
    assert [t for t, _ in by_argmax] == [t for t, _ in by_chain]
    assert [f.completion_tokens for _, f in by_argmax] == [f.completion_tokens for _, f in by_chain]
    generated = sum(f.completion_tokens for _, f in by_argmax)
    assert generated <= stats.argmax_tokens - before <= generated + len(PROMPTS)  # + an end-of-text token each


async def test_cancelling_one_stream_leaves_the_others_unchanged(engine: LlamaCppEngine) -> None:
    alone = [await run(engine, p) for p in PROMPTS[:4]]

    async def cancelled_after_three() -> None:
        stream = engine.generate(PROMPTS[4], SamplingOptions(max_tokens=200, temperature=0))
        seen = 0
        async for event in stream:
            seen += isinstance(event, TextChunk)
            if seen == 3:
                break
        await stream.aclose()  # type: ignore[attr-defined]

    results = await asyncio.gather(cancelled_after_three(), *(run(engine, p) for p in PROMPTS[:4]))
    assert [t for t, _ in results[1:]] == [t for t, _ in alone]  # type: ignore[misc]
    await asyncio.sleep(0.2)
    assert engine.load.running == 0 and engine.load.queued == 0


async def test_a_prompt_of_no_tokens_is_refused_and_the_running_sequences_go_on(engine: LlamaCppEngine) -> None:
    """SmolLM2 adds no BOS, so an empty text is no tokens: refused before it takes a slot. (It once reached
    the decode step, whose IndexError failed every sequence in the batch.)"""
    from node_agent.engines.base import InvalidInput

    alone = [await run(engine, p) for p in PROMPTS[:3]]

    async def empty() -> None:
        await asyncio.sleep(0.05)  # while the others decode
        with pytest.raises(InvalidInput, match="no tokens") as caught:
            await run(engine, "")
        assert caught.value.param == "prompt"

    results = await asyncio.gather(*(run(engine, p) for p in PROMPTS[:3]), empty())
    assert [t for t, _ in results[:3]] == [t for t, _ in alone]  # type: ignore[misc]


async def test_max_tokens_and_finish_reasons(engine: LlamaCppEngine) -> None:
    text, finished = await run(engine, "Once upon a time", SamplingOptions(max_tokens=7, temperature=0))
    assert (finished.reason, finished.completion_tokens) == ("length", 7)
    assert text


async def test_stop_strings_cut_the_output_as_openai_does(engine: LlamaCppEngine) -> None:
    base, _ = await run(engine, "Count: 1, 2, 3,", SamplingOptions(max_tokens=20, temperature=0))
    assert " 5" in base
    cut, finished = await run(
        engine, "Count: 1, 2, 3,", SamplingOptions(max_tokens=20, temperature=0, stops=(" 5", "zzz"))
    )
    assert cut == base[: base.index(" 5")] and finished.reason == "stop"


async def test_seeds_reproduce_sampled_output(engine: LlamaCppEngine) -> None:
    sampled = SamplingOptions(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    first, _ = await run(engine, "Tell me about the sea.", sampled)
    again, _ = await run(engine, "Tell me about the sea.", sampled)
    assert first == again
    others = {
        (await run(engine, "Tell me about the sea.", SamplingOptions(max_tokens=24, temperature=1.0, seed=s)))[0]
        for s in range(5)
    }
    assert len(others) > 1  # different seeds, different samples
    # Seeded requests keep their output when decoded in a batch with others.
    together = await asyncio.gather(*(run(engine, "Tell me about the sea.", sampled) for _ in range(3)))
    assert {t for t, _ in together} == {first}


def test_seeds_map_to_llama_cpps_32_bits_without_random_or_wrapping() -> None:
    assert seed32(0) == 0 and seed32(2**32 - 2) == 2**32 - 2  # below 2**32 - 1: the seed itself
    big = [seed32(s) for s in (2**32 - 1, 2**32, 2**32 + 7, 2**63, 2**64 - 1, 2**64)]
    assert all(0 <= s < 2**32 - 1 for s in big)  # never llama.cpp's "random"
    assert len(set(big)) == len(big) and seed32(2**32 + 7) != 7  # seeds 2**32 apart are not the same


async def test_seeds_of_64_bits_reproduce_their_sample(engine: LlamaCppEngine) -> None:
    # Found by review: seed 2**32 - 1 was llama.cpp's "random" (never the same sample twice), and seed
    # 2**32 + 7 sampled as seed 7.
    def sampled(seed: int, n: int = 1) -> SamplingOptions:
        return SamplingOptions(max_tokens=24, temperature=1.0, seed=seed, n=n)

    prompt = "Tell me about the sea."
    assert (await run(engine, prompt, sampled(2**32 - 1)))[0] == (await run(engine, prompt, sampled(2**32 - 1)))[0]
    assert (await run(engine, prompt, sampled(7)))[0] != (await run(engine, prompt, sampled(2**32 + 7)))[0]

    async def choices(seed: int) -> dict[int, str]:
        texts: dict[int, list[str]] = {0: [], 1: []}
        async for event in engine.generate(prompt, sampled(seed, n=2)):
            if isinstance(event, TextChunk):
                texts[event.index].append(event.text)
        return {i: "".join(t) for i, t in texts.items()}

    assert await choices(2**32 - 2) == await choices(2**32 - 2)  # choice 1's seed is 2**32 - 1


async def test_penalties_change_greedy_output(engine: LlamaCppEngine) -> None:
    prompt = "List the days of the week: Monday, Tuesday, Monday, Tuesday, Monday,"
    plain, _ = await run(engine, prompt, SamplingOptions(max_tokens=32, temperature=0))
    penalised, _ = await run(engine, prompt, SamplingOptions(max_tokens=32, temperature=0, frequency_penalty=2.0))

    def most_repeated(text: str) -> int:
        words = text.split()
        return max((words.count(w) for w in words), default=0)

    assert plain != penalised
    assert most_repeated(penalised) <= most_repeated(plain)


async def run_scored(
    engine: LlamaCppEngine, prompt: str, options: SamplingOptions
) -> tuple[str, list[TokenLogprob], Finished]:
    text: list[str] = []
    scored: list[TokenLogprob] = []
    async for event in engine.generate(prompt, options):
        if isinstance(event, TextChunk):
            text.append(event.text)
            scored.extend(event.logprobs)
        else:
            return "".join(text), scored, event
    raise AssertionError("no Finished event")


SCORED = SamplingOptions(max_tokens=12, temperature=0, logprobs=True, top_logprobs=5)


async def test_logprobs_are_the_models_own_distribution(engine: LlamaCppEngine) -> None:
    import math

    import llama_cpp

    prompt = "The capital of France is"
    text, scored, finished = await run_scored(engine, prompt, SCORED)
    assert len(scored) == finished.completion_tokens
    # The tokens cover the text exactly, each at its offset.
    assert "".join(t.token for t in scored) == text
    assert [t.text_offset for t in scored] == [len("".join(x.token for x in scored[:i])) for i in range(len(scored))]
    for entry in scored:
        assert len(entry.top) == 5
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
        assert sum(math.exp(t.logprob) for t in entry.top) <= 1.0 + 1e-6
        # Greedy decoding took the most likely token.
        assert (entry.token, entry.logprob) == (entry.top[0].token, entry.top[0].logprob)
        assert entry.token_bytes.decode() == entry.token
    # Against llama-cpp-python's own logprobs (a separate context that keeps every position's logits):
    # the same tokens and alternatives; the values agree to llama.cpp's numerics across batch shapes.
    reference = llama_cpp.Llama(str(default_model_path()), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    try:
        theirs = reference.create_completion(prompt, max_tokens=3, temperature=0, logprobs=3)["choices"][0]["logprobs"]  # type: ignore[index]
    finally:
        reference.close()
    for i in range(3):
        assert scored[i].token == theirs["tokens"][i]
        assert abs(scored[i].logprob - float(theirs["token_logprobs"][i])) < 0.1
        ranked = sorted(theirs["top_logprobs"][i].items(), key=lambda kv: -kv[1])
        assert [t.token for t in scored[i].top[:3]] == [token for token, _ in ranked]


async def test_logprobs_in_a_batch_equal_logprobs_alone(engine: LlamaCppEngine) -> None:
    alone = [await run_scored(engine, p, SCORED) for p in PROMPTS]
    together = await asyncio.gather(*(run_scored(engine, p, SCORED) for p in PROMPTS))
    assert [scored for _, scored, _ in together] == [scored for _, scored, _ in alone]
    # Asking for none gives none.
    assert (await run_scored(engine, PROMPTS[0], GREEDY))[1] == []


async def test_logprobs_leave_out_the_tokens_of_a_cut_stop_string(engine: LlamaCppEngine) -> None:
    prompt = "Count: 1, 2, 3,"
    full, all_scored, _ = await run_scored(engine, prompt, SamplingOptions(max_tokens=20, temperature=0, logprobs=True))
    cut, scored, finished = await run_scored(
        engine, prompt, SamplingOptions(max_tokens=20, temperature=0, logprobs=True, stops=(" 5",))
    )
    assert finished.reason == "stop" and cut == full[: full.index(" 5")]
    assert scored == all_scored[: len(scored)]
    assert all(t.text_offset < len(cut) for t in scored)
    joined = "".join(t.token for t in scored)
    assert joined.startswith(cut) and " 5" not in joined
    assert all(t.top == () for t in scored)  # top_logprobs 0: the chosen tokens only


async def test_prefix_is_reused_not_recomputed(engine: LlamaCppEngine) -> None:
    system = "You are a careful assistant. " * 40  # ~240 tokens shared by the requests below
    stats = engine.stats
    assert stats is not None
    fresh_prompt = system + "Question: what is 2+2?"
    start = time.perf_counter()
    _cold, _ = await run(engine, "Unrelated " * 5 + fresh_prompt, SamplingOptions(max_tokens=1, temperature=0))
    cold_time = time.perf_counter() - start
    await run(engine, fresh_prompt, SamplingOptions(max_tokens=1, temperature=0))
    reused_before = stats.reused_prompt_tokens
    start = time.perf_counter()
    _warm, _ = await run(engine, system + "Question: what is 3+3?", SamplingOptions(max_tokens=1, temperature=0))
    warm_time = time.perf_counter() - start
    reused = stats.reused_prompt_tokens - reused_before
    print(f"prefix reuse: {reused} prompt tokens reused; first token {cold_time * 1000:.0f} ms cold, "
          f"{warm_time * 1000:.0f} ms with the prefix cached")  # fmt: skip
    assert reused >= 200
    assert warm_time < cold_time


async def test_a_new_request_keeps_the_running_slots_consecutive() -> None:
    # llama.cpp decodes each run of consecutive KV streams as its own micro-batch; a request that starts
    # while slots 0 and 2 run must take slot 1, not the least recently used slot 3.
    built = LlamaCppEngine(LlamaCppConfig(str(default_model_path()), context_size=512, threads=2, slots=4))
    await built.start()
    try:
        loop = built._loop
        assert loop is not None
        long = SamplingOptions(max_tokens=400, temperature=0)
        first = []
        for n, prompt in enumerate(PROMPTS[:3], start=1):  # one at a time: request i takes slot i
            first.append(asyncio.ensure_future(run(built, prompt, long)))
            while loop.running < n:
                await asyncio.sleep(0.01)
        assert sorted(loop._active) == [0, 1, 2]
        first[1].cancel()  # the request on slot 1 leaves; slots 0 and 2 keep running
        while 1 in loop._active:
            await asyncio.sleep(0.01)
        late = asyncio.ensure_future(run(built, PROMPTS[5], long))
        while loop.running < 3:
            await asyncio.sleep(0.01)
        assert sorted(loop._active) == [0, 1, 2]
        for task in (first[0], first[2], late):
            task.cancel()
        await asyncio.gather(*first, late, return_exceptions=True)
    finally:
        await built.close()


class Posts:
    """Every batch of events the decode thread posts to the event loop, in order (it posts once a decode)."""

    def __init__(self, engine: LlamaCppEngine) -> None:
        assert engine._loop is not None
        self.loop = engine._loop
        self.batches: list[list[tuple[BatchRequest, object]]] = []
        self._original = self.loop._post

    def __enter__(self) -> Posts:
        def recording(callback: Callable[[], None]) -> object:
            assert isinstance(callback, functools.partial)  # of _dispatch, with the decode's events
            self.batches.append(list(callback.args[0]))
            return self._original(callback)

        self.loop._post = recording
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop._post = self._original

    def texts(self, batch: list[tuple[BatchRequest, object]]) -> set[int]:
        """The requests (their ids: a dataclass does not hash) that got text in one batch."""
        return {id(request) for request, item in batch if isinstance(item, TextChunk) and item.text}

    async def until_generating(self, count: int) -> set[int]:
        """Wait until `count` requests have had text; those requests' ids."""
        deadline = time.monotonic() + 60
        while True:
            seen: set[int] = set().union(*(self.texts(b) for b in self.batches))
            if len(seen) >= count:
                return seen
            assert time.monotonic() < deadline, f"only {len(seen)} of {count} requests generated within 60 s"
            await asyncio.sleep(0.01)


async def test_a_new_prompts_first_token_goes_out_before_the_running_sequences_next_ones(
    engine: LlamaCppEngine,
) -> None:
    # Beside sequences that are generating, a new prompt is decoded on its own first (llama.cpp would give
    # it a pass of its own in a shared batch anyway), and its first token posted before the running
    # sequences' next tokens, not with them after both passes.
    long, short = SamplingOptions(max_tokens=300, temperature=0), SamplingOptions(max_tokens=6, temperature=0)
    # A prompt no other test sends: a slot that has it cached whole would leave it nothing to prefill.
    prompt = f"Write a short list of three rivers of Europe (run {time.monotonic_ns()}):"
    with Posts(engine) as posts:
        running = [asyncio.ensure_future(run(engine, p, long)) for p in PROMPTS[1:5]]
        try:
            others = await posts.until_generating(4)
            text, _ = await run(engine, prompt, short)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
    assert text == (await run(engine, prompt, short))[0]  # and its output is what it is alone
    new = next(r for b in posts.batches for r in posts.texts(b) if r not in others)
    at = next(i for i, b in enumerate(posts.batches) if new in posts.texts(b))
    assert not posts.texts(posts.batches[at]) & others, "the first token waited for the running sequences' tokens"
    assert posts.texts(posts.batches[at + 1]) >= others  # who got theirs in the decode right after


async def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_go_on_generating() -> None:
    built = LlamaCppEngine(
        LlamaCppConfig(str(default_model_path()), context_size=1024, threads=2, slots=4, batch_size=64)
    )
    await built.start()
    try:
        prompt = "You are a careful assistant. " * 40 + "Question: what is 2+2?"  # ~240 tokens: 4 chunks of 64
        with Posts(built) as posts:
            running = [asyncio.ensure_future(run(built, p, SamplingOptions(max_tokens=300, temperature=0)))
                       for p in PROMPTS[:2]]  # fmt: skip
            try:
                others = await posts.until_generating(2)
                submitted = len(posts.batches)
                text, finished = await run(built, prompt, SamplingOptions(max_tokens=8, temperature=0))
            finally:
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)
        new = next(r for b in posts.batches for r in posts.texts(b) if r not in others)
        first = next(i for i, b in enumerate(posts.batches) if new in posts.texts(b))
        # While the prompt went in, chunk by chunk, each running sequence got a token every step.
        for request in others:
            got = sum(request in posts.texts(b) for b in posts.batches[submitted:first])
            assert got >= 3, f"a running sequence got {got} tokens while a 4-chunk prompt was prefilled"
        assert finished.completion_tokens >= 1 and text  # the model may answer "4" and stop
        assert text == (await run(built, prompt, SamplingOptions(max_tokens=8, temperature=0)))[0]  # as alone
    finally:
        await built.close()


def _threads() -> set[int]:
    return {int(tid) for tid in os.listdir("/proc/self/task")}


async def test_idle_priority_puts_the_decode_thread_and_llamas_workers_in_sched_idle(engine: LlamaCppEngine) -> None:
    # The module's engine keeps the default: ordinary threads.
    assert engine._loop is not None
    assert os.sched_getscheduler(engine._loop._thread.native_id) == os.SCHED_OTHER
    before = _threads()
    config = LlamaCppConfig(str(default_model_path()), context_size=512, threads=2, slots=2, idle_priority=True)
    idle = LlamaCppEngine(config)
    await idle.start()
    try:
        assert (await run(idle, "The capital of France is"))[0]
        assert idle._loop is not None
        decode = idle._loop._thread.native_id
        assert decode is not None and os.sched_getscheduler(decode) == os.SCHED_IDLE
        # llama.cpp's compute workers (OpenMP's, made by the decode thread at its first decode) inherit it.
        made = {tid: os.sched_getscheduler(tid) for tid in _threads() - before}
        assert sum(policy == os.SCHED_IDLE for policy in made.values()) >= config.threads, made
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # nobody else's
    finally:
        await idle.close()


async def test_requests_beyond_the_slots_wait_in_the_queue(engine: LlamaCppEngine) -> None:
    options = SamplingOptions(max_tokens=48, temperature=0)
    tasks = [asyncio.ensure_future(run(engine, p, options)) for p in PROMPTS + PROMPTS[:4]]  # 12 > 8 slots
    peak_queue = 0
    while not all(t.done() for t in tasks):
        peak_queue = max(peak_queue, engine.load.queued)
        assert engine.load.running <= 8
        await asyncio.sleep(0.005)
    assert peak_queue >= 3
    assert all(t.result()[1].completion_tokens > 0 for t in tasks)


async def test_a_cancelled_request_for_several_choices_does_not_hold_the_queue(engine: LlamaCppEngine) -> None:
    # Found by review: a request for n choices waits at the head of the queue for n free slots, and one
    # cancelled there still waited for them, and every request behind it, although a slot was free.
    counting = SamplingOptions(max_tokens=300, temperature=0)
    hogs = [asyncio.ensure_future(run(engine, "Count: 1, 2, 3,", counting)) for _ in range(7)]  # 7 of 8 slots
    while engine.load.running < 7:
        await asyncio.sleep(0.01)
    several = asyncio.ensure_future(run(engine, "Hello", SamplingOptions(max_tokens=5, n=2)))
    while engine.load.queued < 1:
        await asyncio.sleep(0.01)
    several.cancel()
    with pytest.raises(asyncio.CancelledError):
        await several
    try:
        _, finished = await run(engine, "The capital of France is", SamplingOptions(max_tokens=5, temperature=0))
        assert finished.completion_tokens == 5
        assert not any(h.done() for h in hogs)  # it took the free slot: no running request had to end first
    finally:
        for hog in hogs:
            hog.cancel()
        await asyncio.gather(*hogs, return_exceptions=True)


async def test_a_request_that_reaches_a_closed_decode_loop_is_told_so_not_left_waiting() -> None:
    # Found by review: a request prepared (tokenized, its grammar made) while its replica was being unloaded
    # reached a decode loop whose thread had drained its queue and left: it waited for good.
    async with default_model_engine(1) as engine:
        decode = engine._loop
        assert decode is not None
        tokens = await engine.tokenize("Hello")
        await asyncio.to_thread(decode.close)  # the replica's unload, between the request's preparing and its submit
        engine._loop = None  # closed: as the engine's close leaves it (its close then skips the loop)
        queue: asyncio.Queue[object] = asyncio.Queue()
        decode.submit(BatchRequest(tokens, GREEDY, 4, queue.put_nowait))
        answer = await asyncio.wait_for(queue.get(), 10)  # bounded: it was never answered
        assert isinstance(answer, RuntimeError) and "unloaded" in str(answer)


async def test_concurrent_embeddings_are_micro_batched_and_cached(engine: LlamaCppEngine) -> None:
    batcher = engine.embedder
    texts = [f"sentence number {i} about the weather" for i in range(16)]
    alone = [(await engine.embed([t])).vectors[0] for t in texts[:2]]
    batches_before = batcher.batches
    results = await asyncio.gather(*(engine.embed([t]) for t in texts[2:]))
    assert batcher.batches - batches_before < len(texts[2:]) / 2  # 14 requests, a few embedding calls
    hits_before = batcher.cache_hits
    again = await engine.embed(texts[:2])
    assert batcher.cache_hits - hits_before == 2
    assert again.vectors == alone  # served from the cache, the same vectors
    assert all(len(r.vectors[0]) == len(alone[0]) for r in results)
    counts = [len(await engine.tokenize(t)) for t in texts[:2]]
    assert again.prompt_tokens == sum(counts)


async def test_embedding_limits_are_clear_errors(engine: LlamaCppEngine) -> None:
    from node_agent.engines.base import InvalidInput

    with pytest.raises(InvalidInput, match="at most 2048 inputs"):
        await engine.embed(["x"] * 2049)
    with pytest.raises(InvalidInput, match="characters; the limit is 32768"):
        await engine.embed(["y" * 40_000])


async def test_unified_kv_shares_a_prefix_cached_by_another_slot() -> None:
    engine = LlamaCppEngine(
        LlamaCppConfig(str(default_model_path()), context_size=1024, threads=2, slots=2, unified_kv=True)
    )
    await engine.start()
    try:
        system = "You are a careful assistant. " * 40
        stats = engine.stats
        assert stats is not None
        # Hold slot A with a long generation whose prompt starts with the system prompt...
        holder = asyncio.ensure_future(
            run(engine, system + "Count: 1, 2, 3,", SamplingOptions(max_tokens=200, temperature=0))
        )
        deadline = time.monotonic() + 30
        while stats.generated_tokens < 5 and not holder.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # until the holder's prompt is in the KV cache and it is generating
        assert not holder.done() and engine.load.running == 1
        before = stats.reused_prompt_tokens
        # ...then a request with the same prefix lands in slot B and copies the prefix from slot A.
        _, finished = await run(engine, system + "Say hi.", SamplingOptions(max_tokens=4, temperature=0))
        assert stats.reused_prompt_tokens - before >= 200
        assert finished.completion_tokens > 0
        await holder
    finally:
        await engine.close()
