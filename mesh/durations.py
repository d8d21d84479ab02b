"""google.protobuf.Duration values a peer sends: the type's range, which protobuf's own conversions
(`ToTimedelta`) and etcd's JSON refuse with an exception, so a service checks a Duration before using it."""

from __future__ import annotations

from google.protobuf import duration_pb2

MAX_SECONDS = 315_576_000_000  # about 10,000 years, the range Duration documents


def in_range(duration: duration_pb2.Duration) -> bool:
    """Whether `duration` is one Duration documents: at most MAX_SECONDS either way, nanos below a second,
    and seconds and nanos of one sign."""
    seconds, nanos = duration.seconds, duration.nanos
    return abs(seconds) <= MAX_SECONDS and abs(nanos) < 10**9 and seconds * nanos >= 0
