"""Continuous batching on one llama.cpp context: N sequence slots, one decode per step (two with prompts).

A dedicated thread owns the context. Each step it admits waiting requests into free slots, decodes the
prompt chunks of newly admitted ones (within the batch size), then one token from every sequence that is
generating, and samples every sequence whose logits came out, each with its own sampler chain. Requests
join and leave between steps; a cancelled request frees its slot at the next step.

Prompts beside running sequences: with a KV stream per sequence (the default), llama.cpp cuts a batch into
micro-batches that take the same number of tokens from each of their sequences, so a batch of 7
generating tokens and a 15-token prompt is two passes over the weights (8 tokens, then the prompt's other
14), and every token of it waits for both. So a step decodes its prompt chunks first, in a `llama_decode`
of their own (the same passes), posts the first tokens they give at once, and then decodes the generating
sequences, with those whose prompt just ended. llama.cpp's own server puts prompt chunks and generating
tokens in one batch (up to 2048 tokens, micro-batches of 512): with per-sequence streams the same passes,
the first token a pass later. With a unified KV cache micro-batches are cut by size alone, so there the
chunks ride in the generating sequences' decode.

Each sequence has its own KV stream (unless the KV cache is unified), and llama.cpp decodes one run of
consecutive stream ids in ascending order as one micro-batch: every extra run is another pass over the
weights. So a step's tokens go into the batch in slot order, and a new request prefers the free slot
that keeps the running slots consecutive (measured here: 8 streams took 34 ms a step in slot order, 42 ms
in arrival order).

Results reach the event loop once per decode (one cross-thread wake-up for all its tokens, not one per
token), through the `post` callable the engine gives.

Logprobs, when a request asks: after its token is sampled, a log-softmax of the raw logits at its
position (numpy, on the decode thread; `bench/logprobs_bench.py` here: 1% of the tokens/s at 1 stream,
3% at 8 streams, 5% with 20 alternatives). Each entry waits with the sequence until the text it
starts is released, so the entries travel with their text and those of a cut stop string are dropped
with it.

Structured outputs: a request with a grammar (a JSON schema's, node_agent.engines.json_grammar) gets
llama.cpp's grammar sampler beside its own sampler chain, so it is one more sequence of the same decode
step; both are freed with the sequence. It is sampled as llama.cpp's own common_sampler does: as if free,
then that one token is checked against the grammar, and only when the grammar forbids it is the grammar
applied to the whole vocabulary (about 4 ms a token for this model's 49,152 tokens on 2 cores) and the
token sampled again from what it allows. Greedy decoding picks the same token either way, and sampling
draws from the same distribution as masking first. Once the document is complete the grammar allows
only end-of-generation tokens, so the sequence ends with "stop"; max_tokens can still cut it first
("length"). Stop strings do not apply to a constrained document: they end free text only.

Several choices (`n` > 1): a request takes n slots at once, or waits at the head of the queue until n are
free. Its prompt is computed once, in the first choice's slot; when that prefill ends, the KV cache is
copied to the other choices' slots (`llama_memory_seq_cp`: a copy of the KV stream's buffer when each
sequence has its own, shared cells with a unified cache) and every choice samples its first token from the
same logits, each with its own sampler chain (seed + i) and grammar. From then on they are ordinary
sequences of the batch: each ends on its own, with its own stop strings and logprobs, and a cancelled
request frees all n slots at the next step.

Tool calls (tool_choice "auto"): the grammar is lazy (`llama_sampler_init_grammar_lazy_patterns`): it
waits, allowing everything, until the output contains its trigger word (`<tool_call>`), then replays the
text from the trigger on and constrains the rest. The text after the word, up to the end of the token that
completed it, is replayed into the grammar too, and llama.cpp aborts the whole process when the grammar
refuses it (a C++ exception through ctypes). So while a grammar waits, each token that would complete the
trigger is checked first against what the grammar allows after the word (`Trigger.continuations`); one it
would refuse is set aside and the token sampled again without it, as a grammar would. Tokens in
`BatchRequest.shown` (a model's special token for the trigger) are rendered as their text, so that the
tool-call parser sees them. Stop strings end free text only: once the grammar of calls applies (from the
first token when a call is required or the reply is calls or a response_format's document, else from the
trigger on), none applies, so no stop string cuts a call's arguments.

A prompt echoed with logprobs (the completions API's `echo`, how evaluation harnesses score a text): its
prefill asks llama.cpp for the logits at every prompt position, not only the last, and each prompt token
gets its log probability under the logits before it (`_score`), at most SCORE_CHUNK positions a step over
all the prompts being scored (each position's logits are a row of the vocabulary's size in llama.cpp's
output buffer, and numpy's work on them grows with them: `bench/echo_bench.py`). No cached
prefix is reused for it: a reused position has no logits. Once the prompt is scored the request's
PromptEcho goes out, before its first token; with max_tokens 0 the request ends there ("length").

Prefix reuse: a slot keeps the KV cache of its last request. A new request goes to the free slot whose
cached tokens share the longest prefix with its prompt, or copies that prefix from any other sequence
(`llama_memory_seq_cp`; with a unified KV cache the cells are shared, not copied), and only the rest of
the prompt is computed.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mesh.metrics import BATCH_BUCKETS, FAST_BUCKETS, Distribution
from node_agent.engines.base import (
    ChoiceEnd,
    Finished,
    GenerationEvent,
    InvalidInput,
    PromptEcho,
    SamplingOptions,
    Tally,
    TextChunk,
    TokenLogprob,
    TopLogprob,
)
from node_agent.engines.text_stream import TextStream

log = logging.getLogger(__name__)

Item = GenerationEvent | BaseException
Sink = Callable[[Item], None]
Post = Callable[[Callable[[], None]], object]  # run a callable on the consumers' event loop, thread-safe
# One llama_token_data (id, logit, p) as numpy lays it out: a whole vocabulary of them is filled at once.
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
PENALTY_WINDOW = 64  # tokens the repetition/frequency/presence penalties look back over
# A cached prefix at least this long is worth a slot that splits the batch into more runs; a shorter one
# is cheaper to compute again than an extra pass over the weights at every step of the request.
LONG_PREFIX = 64
# Tokens set aside in one step because they would fire a lazy grammar's trigger with text it refuses; past
# this the request fails (each is one more pass of the chain over the vocabulary).
MAX_TRIGGER_RESAMPLES = 16
# Prompt tokens of a request that scores its prompt, decoded in one step: each keeps a row of logits.
SCORE_CHUNK = 128
RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a seed drawn at random


def seed32(seed: int) -> int:
    """A request's seed (OpenAI's are 64-bit; plus the choice's index) as llama.cpp's 32-bit one, never its
    "random": a seed below 2**32 - 1 is itself, a larger one a hash of it below that, so that every seed
    reproduces its sample and seeds 2**32 apart do not give the same."""
    if seed < RANDOM_SEED:
        return seed
    digest = hashlib.blake2b(seed.to_bytes(16, "little"), digest_size=4).digest()
    return int.from_bytes(digest, "little") % RANDOM_SEED


@dataclass(frozen=True)
class Trigger:
    """What starts a lazy grammar: the first `word` in the output (the grammar's text begins with it), or
    one of `tokens`. After the word the grammar allows only text that begins like one of `continuations`
    (checked for the token that completes the word; see the module's docstring)."""

    word: str
    continuations: tuple[str, ...]
    tokens: tuple[int, ...] = ()

    def pattern(self) -> bytes:
        """The word as a regular expression (ECMAScript, llama.cpp's std::regex), matched anywhere."""
        return "".join(f"\\{c}" if c in r"\^$.|?*+()[]{}" else c for c in self.word).encode()

    def refuses(self, tail: bytes) -> bool:
        """Whether the grammar refuses `tail`, the text after the word in the token that completes it."""
        text = tail.decode(errors="replace")
        return not any(c.startswith(text) for c in self.continuations)


@dataclass
class BatchRequest:
    prompt: list[int]
    options: SamplingOptions
    limit: int  # most tokens to generate, per choice
    sink: Sink  # receives the request's events, on the consumers' event loop
    grammar: str | None = None  # GBNF (root rule `root`) the output is constrained to
    grammar_of: str = "response_format"  # the request field the grammar comes from (named in its errors)
    trigger: Trigger | None = None  # with a grammar: lazy, it starts at this trigger
    shown: frozenset[int] = frozenset()  # special tokens rendered as their text (not as nothing)
    # Echo with logprobs: every prompt token's logprob, in a PromptEcho before the first token. `unwritten`
    # leading tokens are not in the prompt's text (a beginning-of-text token the tokenizer added).
    score_prompt: bool = False
    unwritten: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Kept by the decode thread: the prompt's tokens once it takes a slot, and every choice's tokens so far.
    tally: Tally = field(default_factory=Tally)
    # Kept by the decode thread, for n > 1: the choices that ended, their tokens and the first one's reason.
    ended: int = 0
    generated: int = 0
    first_reason: str = "stop"


@dataclass
class _Sequence:
    slot: int
    request: BatchRequest
    tokens: list[int]  # prompt, then generated tokens
    n_past: int  # tokens already in the KV cache
    sampler: Any
    stream: TextStream
    grammar: Any = None  # llama.cpp's grammar sampler, when the request has a response_format or tools
    # While a lazy grammar waits for its trigger: the end of the output so far (as llama.cpp's grammar
    # renders it, special tokens as text), enough to find the trigger word in. None otherwise.
    awaiting: bytes | None = None
    index: int = 0  # the choice (n > 1)
    # Greedy with nothing else in its chain (no grammar, bias or penalty): the token is the logits' argmax,
    # taken with numpy (7 us a token here) instead of llama_sampler_sample (53 us: it copies the whole
    # vocabulary into a candidates array first). The same token: both take the first of equal maxima.
    argmax: bool = False
    # The request's other choices, waiting in their slots for this one's prompt (n > 1, until its prefill
    # ends); each of them has no tokens until then.
    forks: list[_Sequence] = field(default_factory=list)
    generated: int = 0
    logits_at: int = -1  # index of this sequence's logits in the current batch, or -1
    # With logprobs: sampled tokens whose text has not been released yet (text_offset = where it starts).
    pending: list[TokenLogprob] = field(default_factory=list)
    # Scoring its prompt (BatchRequest.score_prompt): the prompt tokens scored so far, and their text.
    scores: list[TokenLogprob] | None = None
    scored_text: TextStream | None = None


@dataclass
class BatchStats:
    steps: int = 0
    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    computed_prompt_tokens: int = 0  # prompt tokens llama_decode computed (in batches)
    forked_prompt_tokens: int = 0  # prompt tokens of a choice (n > 1) whose KV was copied from the first
    generated_tokens: int = 0
    argmax_tokens: int = 0  # greedy tokens taken as the logits' argmax (_Sequence.argmax), end-of-text included
    grammars: int = 0  # sequences that ran with a grammar
    grammar_checks: int = 0  # tokens sampled under a grammar
    grammar_resamples: int = 0  # of those, tokens the grammar forbade, sampled again with it applied
    trigger_resamples: int = 0  # tokens set aside that would have started a lazy grammar with text it refuses
    # For the node's metrics: each step's time (building the batch, llama_decode, sampling) and sequences.
    step_seconds: Distribution = field(default_factory=lambda: Distribution(FAST_BUCKETS))
    step_sequences: Distribution = field(default_factory=lambda: Distribution(BATCH_BUCKETS))


def _penalised(options: SamplingOptions) -> bool:
    """Whether the options ask for a repetition, frequency or presence penalty (a sampler in the chain)."""
    return bool(options.repetition_penalty != 1.0 or options.frequency_penalty or options.presence_penalty)


def _plain_greedy(options: SamplingOptions) -> bool:
    """Whether the sampler chain `DecodeLoop._sampler` makes for these options is the greedy sampler alone."""
    return options.temperature <= 0 and not options.logit_bias and not _penalised(options)


def _runs(slots: list[int]) -> int:
    """How many runs of consecutive ids the slots form (each run is one micro-batch for llama.cpp)."""
    ordered = sorted(slots)
    return sum(1 for i, slot in enumerate(ordered) if i == 0 or slot != ordered[i - 1] + 1)


def lower_thread_priority(nice: int, idle: bool = False) -> None:
    """Lower the calling thread's priority (and that of the threads it creates from now on; Linux: per
    thread): to the SCHED_IDLE class when `idle`, else this nice value. Neither needs a privilege; failing
    is not worth failing a load for.

    SCHED_IDLE runs the thread only when no ordinary thread wants the core, and a waking ordinary thread
    takes the core at once. A nice value only weighs the shares: the kernel's scheduler (EEVDF) lets a
    thread that has just woken from a pause run on for about a time slice before a waking thread preempts
    it, so after an idle pause llama.cpp's freshly woken threads kept the node's first token from the
    network for 2-3 ms (bench.inference_bench --ttft-only --gap-ms 50)."""
    if idle:
        try:
            policy = getattr(os, "SCHED_IDLE", None)  # Linux's
            if policy is None:
                raise OSError("this system has no SCHED_IDLE class")
            os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: the calling thread
            return
        except OSError as exc:
            log.warning("could not put the compute threads in the SCHED_IDLE class (%s); nice %d instead", exc, nice)
    if nice > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError as exc:
            log.warning("could not set the compute threads' nice value to %d: %s", nice, exc)


def _ranked(rows: np.ndarray, targets: list[int], top_n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of raw logits (a scratch block this overwrites): the log probability of its target token
    under the row's log-softmax, and the row's `top_n` most likely tokens with theirs, most likely first (the
    first of equal ones first). One argmax a rank, each token taken out of its row after it: 20 of them cost
    a fraction of one argpartition over the vocabulary (0.7 ms a row here)."""
    peaks = rows.max(axis=1, keepdims=True)
    norms = peaks[:, 0] + np.log(np.exp(rows - peaks, dtype=np.float64).sum(axis=1))
    everyone = np.arange(len(rows))
    chosen = rows[everyone, targets] - norms
    best = np.empty((len(rows), top_n), dtype=np.int64)
    ranked = np.empty((len(rows), top_n), dtype=np.float64)
    for rank in range(top_n):
        ids = best[:, rank] = rows.argmax(axis=1)
        ranked[:, rank] = rows[everyone, ids] - norms
        rows[everyone, ids] = -np.inf
    return chosen, best, ranked


def _dispatch(events: list[tuple[BatchRequest, Item]]) -> None:
    for request, item in events:
        request.sink(item)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DecodeLoop:
    """Owns one llama.cpp context with `slots` sequences and runs it on its own thread."""

    def __init__(
        self,
        llama_cpp: Any,
        vocab: Any,
        ctx: Any,
        slots: int,
        batch_size: int,
        shared_kv: bool,
        post: Post,
        nice: int = 0,
        idle: bool = False,
    ) -> None:
        self._ll = llama_cpp
        self._vocab = vocab
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.slots = slots
        self._batch_size = batch_size
        self._shared_kv = shared_kv  # a unified KV buffer: a prefix can be shared with another slot
        self._batch = llama_cpp.llama_batch_init(batch_size, 0, 1)
        self._queue: collections.deque[BatchRequest] = collections.deque()
        self._active: dict[int, _Sequence] = {}
        self._cached: dict[int, list[int]] = {s: [] for s in range(slots)}  # KV content of each slot
        self._last_used: dict[int, float] = dict.fromkeys(range(slots), 0.0)
        self._post = post
        self._nice = nice
        self._idle = idle
        self._outbox: list[tuple[BatchRequest, Item]] = []  # this step's events, posted at its end
        self._wake = threading.Condition()
        self._closing = False
        self.stats = BatchStats()
        self._piece = ctypes.create_string_buffer(256)
        self._candidates = np.zeros(self._n_vocab, dtype=TOKEN_DATA)  # constrained sampling's buffer
        self._token_ids = np.arange(self._n_vocab, dtype=np.int32)
        self._one = llama_cpp.llama_token_data()
        self._thread = threading.Thread(target=self._run, name="llama-batch", daemon=True)
        self._thread.start()

    # --- called from other threads --------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def kv_tokens(self) -> int:
        """Tokens whose KV the context holds now (running sequences' and the prefixes kept for reuse), read
        from another thread for the metrics: a snapshot that may be one step old."""
        active = dict(self._active)
        return sum(s.n_past for s in active.values()) + sum(
            len(tokens) for slot, tokens in list(self._cached.items()) if slot not in active
        )

    def submit(self, request: BatchRequest) -> None:
        with self._wake:
            if not self._closing:
                self._queue.append(request)
                self._wake.notify()
                return
        # Closed (its model unloaded) while the request was being prepared: the decode thread may be gone, and
        # a request queued now would wait for good. It is answered as the close answers what was queued.
        self._post(functools.partial(_dispatch, [(request, RuntimeError("the model was unloaded"))]))

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        self._ll.llama_batch_free(self._batch)

    # --- the decode thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        # Before the first decode: llama.cpp's worker threads are created by this thread and inherit it.
        lower_thread_priority(self._nice, self._idle)
        while True:
            with self._wake:
                while not self._closing and not self._queue and not self._active:
                    self._wake.wait()
                if self._closing:
                    break
            try:
                self._admit()
                self._step()
            except Exception as exc:
                log.exception("decode step failed")
                for seq in list(self._active.values()):
                    self._emit(seq.request, exc)
                    self._finish(seq, keep_cache=False)
            self._flush()
        # Closing: nobody waiting on this loop may be left hanging.
        closed = RuntimeError("the model was unloaded")
        for seq in list(self._active.values()):
            self._emit(seq.request, closed)
            self._finish(seq, keep_cache=False)
        while self._queue:
            self._emit(self._queue.popleft(), closed)
        self._flush()

    def _emit(self, request: BatchRequest, item: Item) -> None:
        self._outbox.append((request, item))

    def _flush(self) -> None:
        if self._outbox:
            events, self._outbox = self._outbox, []
            self._post(functools.partial(_dispatch, events))

    def _admit(self) -> None:
        # First come, first served: a request with n choices waits at the head until n slots are free; one
        # cancelled meanwhile leaves at once, so that the requests behind it take the slots that are free.
        while self._queue:
            head = self._queue[0]
            if not head.cancelled.is_set() and len(self._active) + head.options.n > self.slots:
                break
            with self._wake:
                request = self._queue.popleft()
            if request.cancelled.is_set():
                continue
            try:
                self._start(request)
            except Exception as exc:
                log.exception("could not start a sequence")
                self._emit(request, exc)
        if self._queue and self._queue[0].options.n > self.slots:  # the engine refuses these first
            with self._wake:
                request = self._queue.popleft()
            self._emit(request, InvalidInput(f"n is {request.options.n}; this model runs {self.slots} sequences", "n"))

    def _samplers(self, request: BatchRequest) -> list[tuple[Any, Any]]:
        """A sampler chain and grammar (or None) for each choice; none is left behind if one fails."""
        made: list[tuple[Any, Any]] = []
        grammar = None  # this choice's, until its chain is made too
        try:
            for index in range(request.options.n):
                grammar = self._grammar(request)  # first: a grammar may be refused
                made.append((self._sampler(request.options, index), grammar))
                grammar = None
        except BaseException:
            if grammar is not None:
                self._ll.llama_sampler_free(grammar)
            for chain, made_grammar in made:
                self._ll.llama_sampler_free(chain)
                if made_grammar is not None:
                    self._ll.llama_sampler_free(made_grammar)
            raise
        return made

    def _start(self, request: BatchRequest) -> None:
        (sampler, grammar), *others = self._samplers(request)
        free = [s for s in range(self.slots) if s not in self._active]

        def preference(slot: int) -> tuple[int, int, int, float]:
            # A long cached prefix first, then the fewest runs of consecutive slots (a unified cache is
            # one stream: no runs), then any cached prefix, then the least recently used slot.
            reuse = _common_prefix(self._cached[slot], request.prompt)
            runs = 1 if self._shared_kv else _runs([*self._active, slot])
            return (reuse if reuse >= LONG_PREFIX else 0, -runs, reuse, -self._last_used[slot])

        slot = max(free, key=preference)
        reuse = _common_prefix(self._cached[slot], request.prompt)
        source, source_len = slot, reuse
        for other in range(self.slots) if self._shared_kv else ():
            if other != slot:
                n = _common_prefix(self._kv_tokens(other), request.prompt)
                if n > source_len:
                    source, source_len = other, n
        if request.score_prompt:  # every position's logits are needed: none may come from a cache
            source, source_len = slot, 0
        # At least one prompt token must be decoded, to produce the logits of the first sample.
        source_len = min(source_len, len(request.prompt) - 1)
        if source != slot:
            self._ll.llama_memory_seq_rm(self._mem, slot, -1, -1)
            self._ll.llama_memory_seq_cp(self._mem, source, slot, 0, source_len)
        else:
            self._ll.llama_memory_seq_rm(self._mem, slot, source_len, -1)
        self._cached[slot] = request.prompt[:source_len]
        self.stats.prompt_tokens += len(request.prompt)
        request.tally.prompt_tokens = len(request.prompt)
        self.stats.reused_prompt_tokens += source_len
        first = _Sequence(
            slot=slot,
            request=request,
            tokens=list(request.prompt),
            n_past=source_len,
            sampler=sampler,
            grammar=grammar,
            awaiting=b"" if request.trigger is not None else None,
            stream=TextStream(request.options.stops),
            argmax=grammar is None and _plain_greedy(request.options),
        )
        self._active[slot] = first
        self._reserve_forks(first, others)
        if request.score_prompt:
            self._start_scores(first)

    def _start_scores(self, seq: _Sequence) -> None:
        """The first prompt token's entry (nothing before it predicts it); a one-token prompt is scored."""
        seq.scores, seq.scored_text = [], TextStream()
        first = TokenLogprob(*self._named(seq.tokens[0]), math.nan, (), 0)
        seq.scores.append(first)
        seq.scored_text.feed(b"" if seq.request.unwritten > 0 else first.token_bytes)
        if len(seq.request.prompt) == 1:
            self._emit(seq.request, PromptEcho(tuple(seq.scores)))
            seq.scores, seq.scored_text = None, None

    def _reserve_forks(self, first: _Sequence, samplers: list[tuple[Any, Any]]) -> None:
        """Take a slot for each other choice of `first`'s request now (admission counted them): it waits
        there, with no tokens, until `first`'s prompt is computed (`_fork`). The fewest runs of consecutive
        slots, then the least recently used; their cached prefixes are given up."""
        for index, (chain, grammar) in enumerate(samplers, start=1):
            free = [s for s in range(self.slots) if s not in self._active]
            slot = max(free, key=lambda s: (-_runs([*self._active, s]), -self._last_used[s]))
            self._cached[slot] = []
            stream = TextStream(first.request.options.stops)
            waiting = _Sequence(
                slot, first.request, [], 0, chain, stream, grammar=grammar, awaiting=first.awaiting, index=index,
                argmax=first.argmax,
            )  # fmt: skip
            self._active[slot] = waiting
            first.forks.append(waiting)

    def _fork(self, seq: _Sequence, index: int) -> None:
        """`seq`'s prompt is in its KV cache and its logits at `index`: its request's other choices start
        from there, their KV copied from its slot (the whole buffer when each sequence has its own stream,
        which llama.cpp does at the next decode, before that step's tokens are written), and their first
        token sampled from the same logits with their own samplers."""
        forks, seq.forks = seq.forks, []
        for other in forks:
            self._ll.llama_memory_seq_rm(self._mem, other.slot, -1, -1)
            self._ll.llama_memory_seq_cp(self._mem, seq.slot, other.slot, 0, -1)
            other.tokens, other.n_past = list(seq.tokens), seq.n_past
            self.stats.forked_prompt_tokens += seq.n_past
        for other in forks:
            self._sample(other, index)

    def _kv_tokens(self, slot: int) -> list[int]:
        """The tokens whose KV a slot holds now: a running sequence's so far, else its last request's."""
        seq = self._active.get(slot)
        return seq.tokens[: seq.n_past] if seq is not None else self._cached[slot]

    def _grammar(self, request: BatchRequest) -> Any:
        grammar, trigger = request.grammar, request.trigger
        if grammar is None:
            return None
        ll = self._ll
        if trigger is None:
            sampler = ll.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        else:
            patterns = (ctypes.c_char_p * 1)(trigger.pattern())
            tokens = (ll.llama_token * max(1, len(trigger.tokens)))(*trigger.tokens)
            sampler = ll.llama_sampler_init_grammar_lazy_patterns(
                self._vocab, grammar.encode(), b"root", patterns, 1, tokens, len(trigger.tokens)
            )
        if not sampler:
            what = request.grammar_of
            raise InvalidInput(f"llama.cpp could not parse the grammar made from {what}", what)
        self.stats.grammars += 1
        return sampler

    def _sampler(self, options: SamplingOptions, index: int = 0) -> Any:
        """The sampler chain of choice `index`: seeded with seed + index, or at random without a seed."""
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if options.logit_bias:  # first, as llama.cpp's own server orders its samplers
            biases = (ll.llama_logit_bias * len(options.logit_bias))(*options.logit_bias)
            ll.llama_sampler_chain_add(
                chain, ll.llama_sampler_init_logit_bias(self._n_vocab, len(options.logit_bias), biases)
            )
        if _penalised(options):
            ll.llama_sampler_chain_add(
                chain,
                # The binding declares (n_vocab, last_n, ...) but llama.h takes (last_n, ...): the first int
                # is what llama.cpp reads, so both carry the window.
                ll.llama_sampler_init_penalties(
                    PENALTY_WINDOW,
                    PENALTY_WINDOW,
                    options.repetition_penalty,
                    options.frequency_penalty,
                    options.presence_penalty,
                ),
            )
        if options.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        if options.top_k > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(options.top_k))
        if options.top_p < 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(options.top_p, 1))
        if options.min_p > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(options.min_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(options.temperature))
        seed = seed32(options.seed + index) if options.seed is not None else ll.LLAMA_DEFAULT_SEED  # random
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        return chain

    def _step(self) -> None:
        for seq in [s for s in self._active.values() if s.request.cancelled.is_set()]:
            self._finish(seq, keep_cache=True)
        if not self._active:
            return
        separate = not self._shared_kv
        if separate and any(len(s.tokens) - s.n_past > 1 for s in self._active.values()):
            # Prompt chunks first, in a decode of their own, and their first tokens out at once (see the
            # module's docstring); then every generating sequence, those whose prompt just ended included.
            self._decode([], self._batch_size)
            self._flush()
        generating = [(s, 1) for s in self._active.values() if len(s.tokens) - s.n_past == 1]
        self._decode(generating, 0 if separate else self._batch_size - len(generating))

    def _decode(self, plan: list[tuple[_Sequence, int]], budget: int) -> None:
        """One llama_decode: `plan`'s (sequence, tokens) and prompt chunks within `budget`; then sampling."""
        scored = SCORE_CHUNK  # prompt positions whose logits this decode keeps, for all that score a prompt
        for seq in self._active.values():
            remaining = len(seq.tokens) - seq.n_past
            if remaining > 1 and budget > 0:
                take = min(budget, remaining)
                if seq.scores is not None:
                    take = min(take, scored)
                    scored -= take
                if take:
                    plan.append((seq, take))
                    budget -= take
        if not plan:
            return  # llama_decode must never get an empty batch
        started = time.perf_counter()
        batch, n = self._batch, 0
        scoring: list[tuple[_Sequence, int, int]] = []  # (sequence, prompt position, its logits' index)

        def add(seq: _Sequence, start: int, end: int) -> None:
            nonlocal n
            prompt = len(seq.request.prompt)
            self.stats.computed_prompt_tokens += max(0, min(end, prompt) - start)
            scores = seq.scores is not None
            for pos in range(start, end):
                batch.token[n] = seq.tokens[pos]
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.slot
                batch.logits[n] = 0
                if scores and pos < prompt - 1:  # its logits score the next prompt token
                    batch.logits[n] = 1
                    scoring.append((seq, pos, n))
                n += 1
            if end == len(seq.tokens):  # the sequence's last token is in: sample after this step
                batch.logits[n - 1] = 1
                seq.logits_at = n - 1
            seq.n_past = end

        # In slot order, so that consecutive slots make one micro-batch.
        for seq, take in sorted(plan, key=lambda entry: entry[0].slot):
            add(seq, seq.n_past, seq.n_past + take)
        batch.n_tokens = n
        status = self._ll.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        self.stats.steps += 1
        if scoring:
            self._score(scoring)
        for seq in list(self._active.values()):
            if seq.logits_at >= 0:
                index, seq.logits_at = seq.logits_at, -1
                self._sample(seq, index)
        self.stats.step_seconds.observe(time.perf_counter() - started)
        self.stats.step_sequences.observe(len(plan))

    def _score(self, scoring: list[tuple[_Sequence, int, int]]) -> None:
        """For each (sequence, prompt position, logits' index) of this step: the prompt token after that
        position scored as `_logprob` scores a generated one, for all positions at once (one log-softmax
        over a block of rows, not a pass of numpy calls per position); a sequence's PromptEcho once its
        prompt is all scored."""
        rows = np.stack([self._logits(i) for _, _, i in scoring])
        targets = [seq.tokens[pos + 1] for seq, pos, _ in scoring]
        top_n = max(seq.request.options.top_logprobs for seq, _, _ in scoring)
        chosen, best, ranked = _ranked(rows, targets, top_n)
        for row, (seq, pos, _) in enumerate(scoring):
            assert seq.scores is not None and seq.scored_text is not None
            request = seq.request
            wanted = request.options.top_logprobs
            entry = self._entry(
                targets[row], chosen[row], best[row, :wanted], ranked[row, :wanted], seq.scored_text.decoded
            )
            seq.scores.append(entry)
            seq.scored_text.feed(b"" if pos + 1 < request.unwritten else entry.token_bytes)
            if pos + 2 == len(request.prompt):
                self._emit(request, PromptEcho(tuple(seq.scores)))
                seq.scores, seq.scored_text = None, None

    def _logits(self, index: int) -> np.ndarray:
        """The raw logits at `index` of the last batch: a view of llama.cpp's buffer, valid until the next decode."""
        return np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))

    def _named(self, token: int) -> tuple[str, bytes]:
        """A token's text (invalid UTF-8 replaced) and exact bytes, special tokens named."""
        raw = self._piece_of(token, special=True)
        return raw.decode(errors="replace"), raw

    def _entry(self, token: int, logprob: float, best: np.ndarray, ranked: np.ndarray, offset: int) -> TokenLogprob:
        """A token's logprob entry with its alternatives (`best` ids, `ranked` their logprobs), named."""
        top = tuple(TopLogprob(*self._named(int(t)), float(lp)) for t, lp in zip(best, ranked, strict=True))
        return TokenLogprob(*self._named(token), float(logprob), top, offset)

    def _piece_of(self, token: int, special: bool = False) -> bytes:
        size = self._ll.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, special)
        return self._piece.raw[:size] if size > 0 else b""

    def _logprob(self, index: int, token: int, top_n: int, offset: int) -> TokenLogprob:
        """The token's log probability under the raw logits at `index` (before temperature, penalties and
        truncation, as OpenAI reports them), and the `top_n` most likely tokens there. Special tokens are
        named (an end-of-text alternative shows as such, not as nothing)."""
        # A copy: another choice may still sample from these logits (n > 1), and _ranked overwrites its rows.
        chosen, best, ranked = _ranked(self._logits(index)[None, :].copy(), [token], top_n)
        return self._entry(token, chosen[0], best[0], ranked[0], offset)

    def _released(self, seq: _Sequence, everything: bool = False) -> tuple[TokenLogprob, ...]:
        """The pending token logprobs whose text has been released (all of them at the natural end)."""
        if not seq.pending:
            return ()
        sent = seq.stream.sent
        n = len(seq.pending) if everything else sum(1 for t in seq.pending if t.text_offset < sent)
        out, seq.pending = tuple(seq.pending[:n]), seq.pending[n:]
        return out

    def _apply(self, index: int, chain: Any, grammar: Any = None, banned: list[int] | None = None) -> tuple[int, float]:
        """What llama_sampler_sample does, without accepting the token: the chain applied to the logits at
        `index` (after the grammar, when given, and without the `banned` tokens). The token and its logit
        after the chain."""
        ll = self._ll
        candidates = self._candidates
        candidates["id"] = self._token_ids  # the samplers reorder them
        candidates["logit"] = self._logits(index)
        candidates["p"] = 0.0
        if banned:
            candidates["logit"][banned] = -math.inf
        array = ll.llama_token_data_array(candidates.ctypes.data_as(ll.llama_token_data_p), self._n_vocab, -1, False)
        if grammar is not None:
            ll.llama_sampler_apply(grammar, ctypes.byref(array))
        ll.llama_sampler_apply(chain, ctypes.byref(array))
        chosen = array.data[array.selected]  # through `data`: a sampler may move it
        return int(chosen.id), float(chosen.logit)

    def _constrained(self, seq: _Sequence, index: int) -> int:
        """The next token under the sequence's grammar (see the module's docstring)."""
        ll = self._ll
        token, _ = self._apply(index, seq.sampler)
        if seq.awaiting is not None:
            token = self._before_trigger(seq, index, token)
            ll.llama_sampler_accept(seq.grammar, token)  # may fire the trigger: a tail it allows, checked
            ll.llama_sampler_accept(seq.sampler, token)
            return token
        self._one.id, self._one.logit, self._one.p = token, 0.0, 0.0
        ll.llama_sampler_apply(
            seq.grammar, ctypes.byref(ll.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False))
        )
        self.stats.grammar_checks += 1
        if self._one.logit == -math.inf:
            self.stats.grammar_resamples += 1
            token, logit = self._apply(index, seq.sampler, seq.grammar)
            if logit == -math.inf:
                # Accepting a token the grammar forbids would throw inside llama.cpp (an abort, through
                # ctypes): this request fails instead.
                raise RuntimeError("the grammar allows no token here")
        ll.llama_sampler_accept(seq.grammar, token)
        ll.llama_sampler_accept(seq.sampler, token)
        return token

    def _before_trigger(self, seq: _Sequence, index: int, token: int) -> int:
        """`token`, or the one sampled in its place when it would complete the trigger word with text the
        grammar refuses (see the module's docstring). Keeps `seq.awaiting` current: None once triggered."""
        trigger = seq.request.trigger
        assert trigger is not None and seq.awaiting is not None
        word = trigger.word.encode()
        banned: list[int] = []
        while True:
            if token in trigger.tokens:
                seq.awaiting = None
                return token
            text = seq.awaiting + self._piece_of(token, special=True)
            at = text.find(word)
            if at < 0:
                seq.awaiting = text[-(len(word) - 1) :] if len(word) > 1 else b""
                return token
            if not trigger.refuses(text[at + len(word) :]):
                seq.awaiting = None
                return token
            banned.append(token)
            self.stats.trigger_resamples += 1
            if len(banned) > MAX_TRIGGER_RESAMPLES:
                raise RuntimeError("no token completes the tool call's opening as its grammar allows")
            token, logit = self._apply(index, seq.sampler, banned=banned)
            if logit == -math.inf:
                raise RuntimeError("the grammar allows no token here")

    def _sample(self, seq: _Sequence, index: int) -> None:
        if seq.request.limit == 0:  # max_tokens 0 (an echoed prompt, scored): every choice ends here
            forks, seq.forks = seq.forks, []
            for choice in (*forks, seq):
                self._complete(choice, "length")
            return
        if seq.forks:
            self._fork(seq, index)
        if seq.argmax:
            token = int(self._logits(index).argmax())
            self.stats.argmax_tokens += 1
        elif seq.grammar is None:
            token = self._ll.llama_sampler_sample(seq.sampler, self._ctx, index)
        else:
            try:
                token = self._constrained(seq, index)
            except RuntimeError as exc:
                self._emit(seq.request, exc)
                self._finish(seq, keep_cache=False)
                return
            if seq.awaiting is None:
                # Stop strings end free text only: what a grammar constrains ends where the grammar completes
                # it, or a stop string in it would end the reply with a document or arguments that do not
                # parse (see the module's docstring).
                seq.stream.stops_off()
        request = seq.request
        if self._ll.llama_vocab_is_eog(self._vocab, token):
            self._complete(seq, "stop")
            return
        seq.tokens.append(token)
        seq.generated += 1
        self.stats.generated_tokens += 1
        request.tally.completion_tokens += 1
        options = request.options
        if options.logprobs:
            seq.pending.append(self._logprob(index, token, options.top_logprobs, seq.stream.decoded))
        text = seq.stream.feed(self._piece_of(token, special=token in request.shown))
        if text:
            self._emit(request, TextChunk(text, self._released(seq), seq.index))
        if seq.stream.stopped:
            self._complete(seq, "stop")
        elif seq.generated >= request.limit:
            self._complete(seq, "length")

    def _complete(self, seq: _Sequence, reason: str) -> None:
        tail = seq.stream.flush()
        # Tokens of a stop string that was cut out are dropped with it; otherwise every token is reported.
        logprobs = self._released(seq, everything=not seq.stream.stopped)
        request = seq.request
        if tail or logprobs:
            self._emit(request, TextChunk(tail, logprobs, seq.index))
        self._finish(seq, keep_cache=True)
        if request.options.n == 1:
            self._emit(request, Finished(reason, len(request.prompt), seq.generated))  # type: ignore[arg-type]
            return
        self._emit(request, ChoiceEnd(seq.index, reason))  # type: ignore[arg-type]
        request.ended += 1
        request.generated += seq.generated
        if seq.index == 0:
            request.first_reason = reason
        if request.ended == request.options.n:
            self._emit(request, Finished(request.first_reason, len(request.prompt), request.generated))  # type: ignore[arg-type]

    def _finish(self, seq: _Sequence, keep_cache: bool) -> None:
        """Free the sequence's slot and samplers, and those of the choices still waiting for its prompt. Once:
        a sequence already finished (a waiting choice of a cancelled request, say) is left alone."""
        if self._active.get(seq.slot) is not seq:
            return
        for other in seq.forks:
            self._finish(other, keep_cache=False)
        seq.forks = []
        self._active.pop(seq.slot, None)
        self._ll.llama_sampler_free(seq.sampler)
        if seq.grammar is not None:
            self._ll.llama_sampler_free(seq.grammar)
        self._last_used[seq.slot] = time.monotonic()
        if keep_cache:
            self._cached[seq.slot] = seq.tokens[: seq.n_past]
        else:
            self._ll.llama_memory_seq_rm(self._mem, seq.slot, -1, -1)
            self._cached[seq.slot] = []
