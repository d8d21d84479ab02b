"""The node agent's list of control-plane addresses becomes one gRPC target (decision logic only; the move
between control planes with real processes is in tests/test_ha.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from node_agent.server import controlplane_addresses, controlplane_target


def test_one_address_is_used_as_it_is() -> None:
    assert controlplane_target("cp.example:50051") == "cp.example:50051"  # DNS: every record, pick_first
    assert controlplane_target(" dns:///cp.example:50051 ") == "dns:///cp.example:50051"


def test_several_become_one_pick_first_target_in_order() -> None:
    assert controlplane_target("127.0.0.1:1, 127.0.0.2:2,127.0.0.1:1") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert controlplane_target("localhost:7,127.0.0.3:8").startswith("ipv4:127.0.0.1:7,")
    assert controlplane_target("[::1]:5,[::1]:6") == "ipv6:[::1]:5,[::1]:6"


def test_the_load_streams_go_to_each_control_plane_once() -> None:
    assert controlplane_addresses("127.0.0.1:1, 127.0.0.2:2,127.0.0.1:1") == ["127.0.0.1:1", "127.0.0.2:2"]
    assert controlplane_addresses("localhost:7,127.0.0.3:8")[0] == "127.0.0.1:7"  # a name: each of its records
    assert controlplane_addresses("dns:///localhost:9")[0] == "127.0.0.1:9"
    assert controlplane_addresses("[::1]:5") == ["[::1]:5"]
    # One name that does not resolve yet stays as it is: its channel resolves it when it connects.
    assert controlplane_addresses("cp.invalid:50051") == ["cp.invalid:50051"]


@pytest.mark.parametrize("bad", ["", " , ", "127.0.0.1:1,no-port", "127.0.0.1:1,host:port"])
def test_a_bad_list_is_refused_with_what_is_wrong(bad: str) -> None:
    with pytest.raises(ValueError):
        controlplane_target(bad)


def test_the_agent_refuses_a_bad_list_at_start_up() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "node", "--controlplane", "127.0.0.1:1,nowhere"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "fleetlm node: control-plane address 'nowhere' is not host:port" in result.stderr
    assert "Traceback" not in result.stderr
