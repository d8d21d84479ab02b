from __future__ import annotations

from node_agent.engines.text_stream import TextStream


def run(pieces: list[bytes], stops: list[str]) -> tuple[list[str], bool]:
    stream = TextStream(stops)
    out = [stream.feed(p) for p in pieces]
    out.append(stream.flush())
    return [o for o in out if o], stream.stopped


def test_plain_text_passes_through() -> None:
    assert run([b"Hello", b" world"], []) == (["Hello", " world"], False)


def test_multibyte_character_split_across_tokens_is_sent_whole() -> None:
    euro = "€".encode()
    assert run([b"5 ", euro[:1], euro[1:2], euro[2:], b"!"], []) == (["5 ", "€", "!"], False)


def test_stop_string_is_cut_and_never_sent_in_part() -> None:
    chunks, stopped = run([b"one, two", b", thr", b"ee, four"], [", three"])
    assert "".join(chunks) == "one, two"
    assert stopped
    assert all(", thr" not in c for c in chunks)


def test_held_back_prefix_is_released_when_it_does_not_become_a_stop() -> None:
    stream = TextStream(["END"])
    assert stream.feed(b"the E") == "the "
    assert stream.feed(b"N") == ""
    assert stream.feed(b"D?") == ""  # "END" completed
    assert stream.stopped
    stream = TextStream(["END"])
    assert stream.feed(b"the EN") == "the "
    assert stream.feed(b"ding") == "ENding"


def test_stop_inside_one_token_and_earliest_of_several() -> None:
    assert run([b"abcXYZdef"], ["def", "XY"]) == (["abc"], True)


def test_unfinished_prefix_is_flushed_at_the_end() -> None:
    assert run([b"abc", b"E"], ["END"]) == (["abc", "E"], False)


def test_with_stops_off_what_was_held_back_goes_on_and_no_stop_applies() -> None:
    stream = TextStream(['"}'])
    assert stream.feed(b'{"a": "x"') == '{"a": "x'  # the last '"' could start the stop string
    stream.stops_off()
    assert stream.feed(b"}") == '"}'
    assert stream.feed(b' "}') == ' "}' and not stream.stopped


def test_a_character_the_generation_ended_inside_of_is_left_out_not_replaced() -> None:
    """max_tokens reached between a character's bytes: the text ends before it (it ended in U+FFFD); bytes
    that are no UTF-8 inside the text are still U+FFFD."""
    party = "🎉".encode()
    assert run([party, party[:2]], []) == (["🎉"], False)
    assert run([b"a\xff", b"b"], []) == (["a\ufffd", "b"], False)
