"""Turning a stream of token bytes into text deltas: whole UTF-8 characters only, stop strings cut out.

Shared by every engine that produces tokens itself. Pure logic, unit-tested.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Feed token bytes; get the text that is safe to send.

    Text is held back while it could still be the start of a stop string, so a stop string is never sent
    in part; once one is complete, the text before it is released and `stopped` is set.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._text = ""
        self._sent = 0
        self.stopped = False

    @property
    def decoded(self) -> int:
        """Characters decoded so far (sent or held back)."""
        return len(self._text)

    @property
    def sent(self) -> int:
        """Characters released so far."""
        return self._sent

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; returns newly releasable text (possibly empty)."""
        if self.stopped:
            return ""
        self._text += self._decoder.decode(data)
        unsent = self._text[self._sent :]
        # A stop string can only start in the unsent part: any prefix of one is held back.
        hits = [i for i in (unsent.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(self._sent + min(hits))
        return self._release(len(self._text) - self._held_back(unsent))

    def stops_off(self) -> None:
        """From now on no stop string applies (text held back for one is released with the next feed)."""
        self._stops = []

    def flush(self) -> str:
        """At the end of generation: release what was held back (it did not become a stop string). A character
        the generation ended inside of (max_tokens reached between its bytes) is left out, as llama-server
        leaves it out of a chat: not sent as a U+FFFD at the end of the text."""
        if self.stopped:
            return ""
        self._decoder.reset()
        return self._release(len(self._text))

    def _held_back(self, unsent: str) -> int:
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(unsent)), longest, -1):
                if unsent.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, end: int) -> str:
        chunk = self._text[self._sent : end]
        self._sent = end
        return chunk
