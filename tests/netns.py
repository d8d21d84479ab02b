"""Hosts of their own on one machine, for tests that cut a node off the network instead of killing it.

`Network` makes a private bridge in the root namespace with the first address of a /24 the test picks
(one no route on this machine covers yet), and one network namespace per host joined to it by a veth
pair, with the next addresses. A process started with `Network.argv(host, ...)` runs in the host's
namespace: it reaches the root namespace (control plane, edge) at `Network.gateway` over the bridge, and
the root namespace reaches it at its own address. Traffic stays on this machine: the namespaces have no
other link and no default route, and the root namespace routes the whole /24 to the bridge, with a
blackhole route under it so nothing for the /24 ever follows the default route out, even while a link is
down.

`cut(host)` takes the root side of the host's veth down: every packet either way is dropped silently, as
in a real partition (no RST, no ICMP), and both sides keep their addresses and connections. `heal(host)`
brings it back up. Only `ip` (iproute2) is needed; `tc` has no netem or classifiers on these kernels, and
neither iptables nor nft is installed.

Names carry the pid of the test process and a counter, so a run killed before its cleanup leaves nothing
a later run collides with; `Network()` also removes what earlier runs of dead processes left.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import subprocess

PREFIX = "flt"  # every namespace, bridge and veth these tests create starts with it
_counter = itertools.count()


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return f"network namespaces need root (the tests run as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}probe"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as exc:
        return f"ip netns add fails: {exc}"
    _ip("netns", "del", probe, check=False)
    return None


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> None:
    """Delete the namespaces and links of earlier runs whose test process is gone."""
    mine = re.compile(rf"^({PREFIX}(\d+)\S*)")
    names = [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]
    links = [m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)", _ip("-o", "link"), re.M)]
    for kind, items in (("link", links), ("netns", names)):
        for name in items:
            match = mine.match(name)
            if match and not _pid_alive(int(match.group(2))):
                _ip(kind, "del", match.group(1), check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no route or address on this machine overlaps, starting from one the pid
    picks so that runs at the same time start apart."""
    taken = [
        ipaddress.ip_network(word, strict=False)
        for line in _ip("-4", "route", "show", "table", "all").splitlines()
        for word in line.split()[:2]
        if re.fullmatch(r"\d+\.\d+\.\d+\.\d+(/\d+)?", word)
    ]
    start = os.getpid() % 10_000 + next(_counter) * 37
    for i in range(65_536):
        n = (start + i) % 65_536
        subnet = ipaddress.ip_network(f"10.{n >> 8}.{n & 255}.0/24")
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    raise RuntimeError("no free /24 in 10.0.0.0/8")


class Network:
    """A bridge in the root namespace and a namespace per host; `close()` removes all of it."""

    def __init__(self) -> None:
        remove_leftovers()
        self.tag = f"{PREFIX}{os.getpid()}x{next(_counter)}"  # at most 15 characters with the suffixes below
        self.subnet = _free_subnet()
        hosts = self.subnet.hosts()
        self.gateway = str(next(hosts))
        self._addresses = hosts
        self.bridge = f"{self.tag}b"
        self.hosts: dict[str, tuple[str, str, str]] = {}  # host -> (namespace, root-side veth, address)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            _ip("route", "add", "blackhole", str(self.subnet), "metric", "4000")
        except BaseException:
            self.close()
            raise

    def add_host(self, name: str) -> str:
        """A namespace joined to the bridge; returns its address."""
        i = len(self.hosts)
        namespace, veth = f"{self.tag}n{i}", f"{self.tag}v{i}"
        address = str(next(self._addresses))
        self.hosts[name] = (namespace, veth, address)
        _ip("netns", "add", namespace)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0", netns=namespace)
        _ip("link", "set", "eth0", "up", netns=namespace)
        _ip("link", "set", "lo", "up", netns=namespace)
        return address

    def address(self, host: str) -> str:
        return self.hosts[host][2]

    def argv(self, host: str, argv: list[str]) -> list[str]:
        """`argv` run inside the host's namespace (`ip netns exec` execs it: same pid, same signals)."""
        return ["ip", "netns", "exec", self.hosts[host][0], *argv]

    def cut(self, host: str) -> None:
        _ip("link", "set", self.hosts[host][1], "down")

    def heal(self, host: str) -> None:
        _ip("link", "set", self.hosts[host][1], "up")

    def close(self) -> None:
        """Remove every veth, namespace and the bridge (and its routes); never raises, so it is safe in a
        finalizer after a failed test."""
        for namespace, veth, _ in self.hosts.values():
            _ip("link", "del", veth, check=False)  # takes its peer in the namespace with it
            _ip("netns", "del", namespace, check=False)
        _ip("route", "del", "blackhole", str(self.subnet), "metric", "4000", check=False)
        _ip("link", "del", self.bridge, check=False)
        self.hosts.clear()
