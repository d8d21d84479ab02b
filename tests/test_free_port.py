"""Ports for child servers (mesh.lifecycle.free_port): outside the range the OS gives outgoing connections,
so a connect() made between the pick and the child's bind cannot take the port, and never handed out twice.
The fresh-clone suite once failed on an edge's "address already in use" for a port picked by binding to 0."""

from __future__ import annotations

import socket

import pytest

from mesh.lifecycle import FREE_PORT_SPAN, free_port, free_port_pair


def ephemeral_range() -> tuple[int, int]:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        low, high = ranges.read().split()
    return int(low), int(high)


def test_ports_are_outside_the_outgoing_range_distinct_and_free() -> None:
    low, _ = ephemeral_range()
    if low - FREE_PORT_SPAN < 1024:
        pytest.skip(f"this machine's outgoing range starts at {low}: no room below it")
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(low - FREE_PORT_SPAN <= port < low for port in ports), sorted(ports)[:5]
    for port in ports[:50]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free now: nobody listens there


def test_outgoing_connections_never_take_a_handed_out_port() -> None:
    ports = {free_port() for _ in range(50)}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        address = listener.getsockname()
        clients = [socket.create_connection(address) for _ in range(200)]
        try:
            taken = {client.getsockname()[1] for client in clients}
        finally:
            for client in clients:
                client.close()
    assert not taken & ports


def test_a_port_someone_listens_on_is_never_handed_out() -> None:
    listeners = []
    try:
        for _ in range(100):
            sock = socket.socket()
            sock.bind(("127.0.0.1", free_port()))
            sock.listen()
            listeners.append(sock)
        busy = {sock.getsockname()[1] for sock in listeners}
        assert not {free_port() for _ in range(200)} & busy
    finally:
        for sock in listeners:
            sock.close()


def test_a_port_pair_is_two_free_ports_in_a_row_and_neither_is_handed_out_again() -> None:
    """etcd's client port and its peer port, one above (as `fleetlm up` lays them out): a free_port after
    the pair never gives the upper one to another server (the project's CI once saw the edge fail to bind
    the embedded etcd's peer port)."""
    pairs = [free_port_pair() for _ in range(20)]
    taken = {p for port in pairs for p in (port, port + 1)}
    assert len(taken) == 40
    later = {free_port() for _ in range(300)}
    assert not later & taken
    for port in pairs:
        for each in (port, port + 1):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", each))  # free now: a child server may bind it
