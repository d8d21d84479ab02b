"""llama.cpp's own log lines through Python's logging (logger `llama.cpp`).

llama.cpp writes its messages straight to stderr (llama-cpp-python's callback prints them), bypassing the
node's log format: one bare line such as "llama_init_from_model: model default pooling_type is [-1], but
[1] was specified" breaks `--log-format json`. Here they become records of the node's own logger: its
warnings and errors at their level, its chatter (model loading, context sizes) at DEBUG, where
llama-cpp-python's verbose=False keeps them out of sight too.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("llama.cpp")

# ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous message).
# (llama-cpp-python's own _logger.py still lists an older order, INFO 1 ... DEBUG 4, under which llama.cpp's
# info chatter came out as warnings and its errors as debug.)
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_CONTINUE = 5


class _Lines:
    """llama.cpp sends a message in pieces; a record is logged per complete line."""

    def __init__(self) -> None:
        self.level = logging.DEBUG
        self.pending = ""

    def add(self, level: int, text: str) -> None:
        if level != _CONTINUE:
            self.level = _LEVELS.get(level, logging.DEBUG)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip() and log.isEnabledFor(self.level):
                log.log(self.level, "%s", line.rstrip())


_lines = _Lines()
_callback = None  # kept referenced: llama.cpp holds only a C pointer to it


def route() -> None:
    """Send llama.cpp's log messages to `log` from now on (it replaces llama-cpp-python's printer)."""
    global _callback
    import llama_cpp

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        _lines.add(level, text.decode("utf-8", errors="replace"))

    _callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
