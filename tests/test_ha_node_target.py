"""The node agent's list of control-plane addresses becomes one gRPC target, and the control planes it uses one
at a time (decision logic only; the move between control planes with real processes is in tests/test_ha.py
and tests/test_ha_frozen_controlplane.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from mesh.controlplane_addresses import controlplane_addresses, controlplane_target, records
from node_agent.controlplanes import ControlPlanes
from node_agent.registration import MIN_DEADLINE_SECONDS, heartbeat_deadline


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


def test_only_a_single_name_with_several_records_is_spread_over_them() -> None:
    """A name with several records is tested with processes (test_ha_dns_records); nothing else is spread:
    a list is used as it is given, an address or a name with one record is one control plane."""
    assert records("127.0.0.1:1") == []
    assert records("localhost:7") == []  # one IPv4 record here (IPv6 ones are not mixed in)
    assert records("127.0.0.1:1,127.0.0.2:2") == []
    assert records("cp.invalid:50051") == []  # not resolved yet: its channel resolves it when it connects


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


def test_a_heartbeat_waits_for_half_of_what_is_left_of_the_lease_when_it_can_move_on() -> None:
    # Lease TTL 10 s, --rpc-timeout-seconds 5: 5.5 s left at a heartbeat leaves 2.75 s for the next control plane.
    assert heartbeat_deadline(5.5, 10, 5, several=True) == 2.75
    assert heartbeat_deadline(2.6, 10, 5, several=True) == 1.3
    # Never less than the floor (within the timeout), never more than half the TTL or the timeout.
    assert heartbeat_deadline(0.4, 10, 5, several=True) == MIN_DEADLINE_SECONDS
    assert heartbeat_deadline(-3, 10, 0.5, several=True) == 0.5
    assert heartbeat_deadline(20, 10, 5, several=True) == 5
    assert heartbeat_deadline(20, 3, 5, several=True) == 1.5
    # With no other control plane to move to, all that is left: asking the same one again is no better.
    assert heartbeat_deadline(4.0, 10, 5, several=False) == 4.0


def test_the_agent_moves_on_once_from_the_control_plane_that_failed() -> None:
    async def moves() -> None:
        async with ControlPlanes(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]) as using:
            turn, _ = using.current()
            waiting = asyncio.ensure_future(using.moved_from(turn))
            assert using.move_on(turn) and using.address(using.turn) == "127.0.0.1:2"
            await asyncio.wait_for(waiting, 1)
            # The heartbeat and the assignment stream found the same one gone: one move, not two.
            assert not using.move_on(turn) and using.address(using.turn) == "127.0.0.1:2"
            assert using.move_on(using.turn) and using.move_on(using.turn)
            assert using.address(using.turn) == "127.0.0.1:1"  # round again, in the order given
        async with ControlPlanes(["cp.example:50051"]) as alone:
            assert not alone.several and not alone.move_on(alone.turn)  # one channel: pick_first over its records

    asyncio.run(moves())


@pytest.mark.parametrize("node_id", ["bad/id", ""])
def test_the_agent_refuses_a_node_id_the_control_plane_would_refuse_at_start_up(node_id: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "node", "--node-id", node_id, "--controlplane", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"the node id {node_id!r} must not be empty nor contain '/'" in result.stderr
    assert "unreachable" not in result.stderr and "Traceback" not in result.stderr
