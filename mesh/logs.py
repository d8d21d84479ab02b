"""One log format for every fleetlm process."""

from __future__ import annotations

import logging
import sys


def setup(component: str, level: str = "INFO") -> None:
    """Log to stderr with the component's name, so `fleetlm up`'s merged output stays readable."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {component:<12} %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and httpx are chatty at INFO about things operators do not need.
    for noisy in ("httpx", "aetcd"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
