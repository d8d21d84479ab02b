"""google.protobuf.Duration and Timestamp values: the types' ranges, which protobuf's own conversions
(`ToTimedelta`, `FromNanoseconds`) and etcd's JSON refuse with an exception, so a service checks a value a
peer sends (or one it derives from it, such as an expiry) before using it."""

from __future__ import annotations

from google.protobuf import duration_pb2

MAX_SECONDS = 315_576_000_000  # about 10,000 years, the range Duration documents
LAST_TIMESTAMP_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the last time a Timestamp may hold


def in_range(duration: duration_pb2.Duration) -> bool:
    """Whether `duration` is one Duration documents: at most MAX_SECONDS either way, nanos below a second,
    and seconds and nanos of one sign."""
    seconds, nanos = duration.seconds, duration.nanos
    return abs(seconds) <= MAX_SECONDS and abs(nanos) < 10**9 and seconds * nanos >= 0
