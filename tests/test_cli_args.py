"""The `fleetlm` command line refuses what it cannot use with one line naming the flag, never a traceback:
ports outside 1-65535, a key's limits outside what the API holds, negative durations, unreadable TLS files;
a service's settings that are not finite numbers are refused naming the setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FLEETLM = str(Path(sys.executable).parent / "fleetlm")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["up", "--http-port", "-1"], "argument --http-port: -1 is not a port (1-65535)"),
        (["up", "--grpc-port", "70000"], "argument --grpc-port: 70000 is not a port (1-65535)"),
        (["up", "--node-port", "http"], "argument --node-port: 'http' is not a whole number"),
        (["keys", "create", "k", "--rpm", "-5"], "argument --rpm: -5 must be from 0 (no limit) to 4294967295"),
        (["keys", "create", "k", "--tpm", "99999999999"], "argument --tpm: 99999999999 must be from 0"),
        (["keys", "create", "k", "--concurrency", "1.5"], "argument --concurrency: '1.5' is not a whole number"),
        (["keys", "create", "k", "--expires-in", "-10"], "argument --expires-in: -10 must be a number of seconds"),
        (["status", "--interval", "0"], "argument --interval: 0 must be a number of seconds more than 0"),
        (["status", "--interval", "nan"], "argument --interval: nan must be a number of seconds, 0 or more"),
        # A service's settings are finite: an edge started with --request-timeout inf failed every request.
        (["edge", "--request-timeout", "inf"], "request_timeout_seconds\n  Input should be a finite number"),
        (["controlplane", "--startup-grace", "nan"], "startup_grace_seconds\n  Input should be a finite number"),
        (["node", "--engine-health-seconds", "inf"], "engine_health_seconds\n  Input should be a finite number"),
        (
            ["keys", "create", "k", "--tls-ca", "/nonexistent/ca.crt", "--tls-cert", "a", "--tls-key", "b"],
            "fleetlm keys: cannot read a TLS file: [Errno 2] No such file or directory: '/nonexistent/ca.crt'",
        ),
    ],
)
def test_a_bad_argument_is_one_line_naming_it(argv: list[str], said: str, tmp_path: Path) -> None:
    # Nothing listens on port 1: a command that got as far as calling would fail there, not hang.
    result = subprocess.run(
        [FLEETLM, *argv, *(["--controlplane", "127.0.0.1:1"] if argv[0] == "keys" else [])],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert said in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
