"""google.protobuf.Duration and Timestamp values: the types' ranges, which protobuf's own conversions
(`ToTimedelta`, `FromNanoseconds`) and etcd's JSON refuse with an exception, so a service checks a value a
peer sends (or one it derives from it, such as an expiry) before using it."""

from __future__ import annotations

from google.protobuf import duration_pb2

MAX_SECONDS = 315_576_000_000  # about 10,000 years, the range Duration documents
FIRST_TIMESTAMP_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z, the first time a Timestamp may hold
LAST_TIMESTAMP_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the last


def in_range(duration: duration_pb2.Duration) -> bool:
    """Whether `duration` is one Duration documents: at most MAX_SECONDS either way, nanos below a second,
    and seconds and nanos of one sign."""
    seconds, nanos = duration.seconds, duration.nanos
    return abs(seconds) <= MAX_SECONDS and abs(nanos) < 10**9 and seconds * nanos >= 0


def non_negative(duration: duration_pb2.Duration) -> bool:
    """Whether `duration` is in range and not negative: what a timeout or a wait may be."""
    return in_range(duration) and duration.seconds >= 0 and duration.nanos >= 0


def timestamp_in_range(seconds: int, nanos: int) -> bool:
    """Whether a Timestamp's fields are one it documents: years 1 to 9999, nanos below a second."""
    return FIRST_TIMESTAMP_SECONDS <= seconds <= LAST_TIMESTAMP_SECONDS and 0 <= nanos < 10**9
