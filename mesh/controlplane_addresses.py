"""The control planes a node or an edge is given (`--controlplane`): a comma-separated list of host:port,
any of them a DNS name. What to dial, and how: one address is one gRPC target, several are each a control
plane of their own, and so is each record of a DNS name that has several (a node and an edge move from one
that stops answering to the next by themselves, node_agent.controlplanes and edge.route_feed, which one
channel's pick_first would do only once the silent connection broke)."""

from __future__ import annotations

import asyncio
import logging
import socket

log = logging.getLogger(__name__)


def resolved(entries: list[str]) -> list[str]:
    """Every address the entries (host:port each) resolve to, in order and once each, of one address family
    (IPv4 when there is any): a gRPC target holds one family."""
    v4: list[str] = []
    v6: list[str] = []
    for entry in entries:
        host, sep, port = entry.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"control-plane address {entry!r} is not host:port")
        for family, *_, sockaddr in socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM):
            if family == socket.AF_INET and f"{sockaddr[0]}:{port}" not in v4:
                v4.append(f"{sockaddr[0]}:{port}")
            elif family == socket.AF_INET6 and f"[{sockaddr[0]}]:{port}" not in v6:
                v6.append(f"[{sockaddr[0]}]:{port}")
    return v4 or v6


def _entries(addresses: str) -> list[str]:
    entries = [a.strip() for a in addresses.split(",") if a.strip()]
    if not entries:
        raise ValueError("no control-plane address given")
    return entries


def controlplane_target(addresses: str) -> str:
    """The gRPC target for one or several control planes. One address is used as it is (a DNS name that
    resolves to several records gives the channel several addresses). Several become one
    `ipv4:`/`ipv6:` target, host names resolved now (joining and renewing the certificate use it: its
    pick_first policy uses the first that answers). The registration and the assignment stream use the
    addresses one at a time instead (node_agent.controlplanes, and `records` for a name), which moves on
    from one that stops answering without waiting for its connection to break."""
    entries = _entries(addresses)
    if len(entries) == 1:
        return entries[0]
    found = resolved(entries)
    return ("ipv4:" if ":" not in found[0].rsplit(":", 1)[0] else "ipv6:") + ",".join(found)


def controlplane_addresses(addresses: str) -> list[str]:
    """Each control plane once, as host:port: the load streams go to every one. Host names are resolved now
    (a DNS name with several records is several control planes); one that does not resolve yet is kept as
    it is, for its channel to resolve when it connects."""
    entries = _entries(addresses)
    try:
        return resolved([e.removeprefix("dns:///") for e in entries])
    except (OSError, ValueError):
        if len(entries) > 1:
            raise  # the same list as a target is refused at start-up already
        return entries


def records(addresses: str) -> list[str]:
    """The addresses of a single DNS name with several records, each a control plane of its own, and the name
    itself last (its channel resolves the name again when it connects, so a control plane that has moved is
    still found); [] when `addresses` is a list, an address, or a name with one record or none yet."""
    entries = _entries(addresses)
    if len(entries) != 1:
        return []
    try:
        found = resolved([entries[0].removeprefix("dns:///")])
    except (OSError, ValueError):
        return []
    return [*found, entries[0]] if len(found) > 1 else []


async def each_record(addresses: str) -> list[str]:
    """`records`, resolved off the event loop, and said once in the log (the node's and the edge's start)."""
    spread = await asyncio.to_thread(records, addresses)
    if spread:
        named = addresses.strip()
        log.info("control plane %s has %d addresses, each used in turn: %s", named, len(spread) - 1, ", ".join(spread))
    return spread
