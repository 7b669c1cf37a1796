"""A small internet with home routers doing NAT, in network namespaces.

    with nat_topology(num_homes=2, rate="100mbit") as net:
        net.public.prefix          # ["ip", "netns", "exec", <public ns>]: the coordinator, reachable nodes
        net.public_ip              # the public namespace's address (a bridge every router's WAN joins)
        net.homes[0].prefix        # a home namespace: behind its router, it can dial out, nobody can dial in
        net.homes[0].ip            # its private address (both homes use the same private subnet, as real ones do)
        net.homes[0].router_wan_ip # its router's public address (what the coordinator sees)
        net.harness_ip             # this (root) namespace's address on the public bridge: tests and
                                   # benchmarks reach the coordinator from here, unshaped

Each router namespace forwards between its LAN and WAN veths, masquerades what leaves on the WAN
(``iptables -t nat -A POSTROUTING -o wan -j MASQUERADE``) and drops new connections coming in
from the WAN (``iptables -A FORWARD -i wan -m conntrack --ctstate NEW -j DROP``, and the same on
INPUT: the router itself answers nothing there, not even a reset), as home routers do; no port is
forwarded. The WAN link of every router is shaped with ``tc tbf`` both ways. With
``nat=False`` the same routers route a public subnet of each home's own instead of doing NAT
(same hops, same shaping: the "direct" baseline of bench/nat.py).

Names carry the pid so concurrent runs do not collide; everything is deleted on exit. Skips the
calling test when not root / no ``ip``, ``tc`` or ``iptables`` (``skip=False``: raises
:class:`~tests.helpers.netns.NetnsUnavailable` instead, for benchmarks).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.helpers.netns import _unavailable, netns_unavailable_reason


@dataclass(frozen=True)
class Namespace:
    name: str
    ip: str

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]


@dataclass(frozen=True)
class Home(Namespace):
    router: str = ""
    router_wan_ip: str = ""


@dataclass
class NatTopology:
    public: Namespace
    homes: list[Home] = field(default_factory=list)
    nat: bool = True
    harness_ip: str = ""

    @property
    def public_ip(self) -> str:
        return self.public.ip


def _sh(*argv: str) -> None:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {out.stderr.strip()}")


def _shape(prefix: list[str], dev: str, rate: str) -> None:
    _sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "100ms")


@contextmanager
def nat_topology(*, num_homes: int = 2, rate: str | None = "100mbit", nat: bool = True, skip: bool = True):
    reason = netns_unavailable_reason() or (None if shutil.which("iptables") else "`iptables` is not installed")
    if reason:
        _unavailable(reason, skip)
    tag = f"{os.getpid() % 100000}"
    net16 = f"10.{100 + os.getpid() % 100}"  # the "internet": <net16>.0.0/24
    created: list[str] = []
    uplinks: list[str] = []

    def ns(name: str) -> str:
        _sh("ip", "netns", "add", name)
        created.append(name)
        _sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    try:
        try:
            pub = ns(f"swnp{tag}")
            pfx = ["ip", "netns", "exec", pub]
            _sh("ip", "-n", pub, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", pub, "addr", "add", f"{net16}.0.1/24", "dev", "br0")
            _sh("ip", "-n", pub, "link", "set", "br0", "up")
            topo = NatTopology(public=Namespace(pub, f"{net16}.0.1"), nat=nat, harness_ip=f"{net16}.0.254")
            _sh("ip", "link", "add", f"swnu{tag}", "type", "veth", "peer", "name", f"swnv{tag}")
            uplinks.append(f"swnu{tag}")
            _sh("ip", "link", "set", f"swnv{tag}", "netns", pub)
            _sh("ip", "-n", pub, "link", "set", f"swnv{tag}", "master", "br0")
            _sh("ip", "-n", pub, "link", "set", f"swnv{tag}", "up")
            _sh("ip", "addr", "add", f"{topo.harness_ip}/24", "dev", f"swnu{tag}")
            _sh("ip", "link", "set", f"swnu{tag}", "up")
            for i in range(num_homes):
                wan_ip = f"{net16}.0.{10 + i}"
                home = ns(f"swnh{i}{tag}")
                # public side: a veth on the bridge; its far end is the router's WAN
                far = ns(f"swnr{i}{tag}")
                rp = ["ip", "netns", "exec", far]
                _sh("ip", "link", "add", f"swnw{i}{tag}", "type", "veth", "peer", "name", f"swnb{i}{tag}")
                _sh("ip", "link", "set", f"swnb{i}{tag}", "netns", pub)
                _sh("ip", "-n", pub, "link", "set", f"swnb{i}{tag}", "master", "br0")
                _sh("ip", "-n", pub, "link", "set", f"swnb{i}{tag}", "up")
                _sh("ip", "link", "set", f"swnw{i}{tag}", "netns", far)
                _sh("ip", "-n", far, "link", "set", f"swnw{i}{tag}", "name", "wan")
                _sh("ip", "-n", far, "addr", "add", f"{wan_ip}/24", "dev", "wan")
                _sh("ip", "-n", far, "link", "set", "wan", "up")
                if rate:  # both directions of the WAN link: the router's upload and its download
                    _shape(rp, "wan", rate)
                    _shape(pfx, f"swnb{i}{tag}", rate)
                # the LAN: with NAT the private 192.168.1.0/24 (every home the same, as real ones);
                # without, a public subnet of its own routed to it (same hops and shaping: the baseline)
                lan = "192.168.1" if nat else f"{net16}.{1 + i}"
                _sh("ip", "link", "add", f"swnl{i}{tag}", "type", "veth", "peer", "name", f"swnh{i}{tag}x")
                _sh("ip", "link", "set", f"swnl{i}{tag}", "netns", far)
                _sh("ip", "link", "set", f"swnh{i}{tag}x", "netns", home)
                _sh("ip", "-n", far, "link", "set", f"swnl{i}{tag}", "name", "lan")
                _sh("ip", "-n", far, "addr", "add", f"{lan}.1/24", "dev", "lan")
                _sh("ip", "-n", far, "link", "set", "lan", "up")
                _sh("ip", "-n", home, "link", "set", f"swnh{i}{tag}x", "name", "eth0")
                _sh("ip", "-n", home, "addr", "add", f"{lan}.2/24", "dev", "eth0")
                _sh("ip", "-n", home, "link", "set", "eth0", "up")
                _sh("ip", "-n", home, "route", "add", "default", "via", f"{lan}.1")
                _sh(*rp, "sysctl", "-qw", "net.ipv4.ip_forward=1")
                if nat:
                    _sh(*rp, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE")
                    _sh(*rp, "iptables", "-A", "FORWARD", "-i", "wan", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
                    # and the router itself serves nothing on its WAN: silence, not a reset (as home routers)
                    _sh(*rp, "iptables", "-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
                topo.homes.append(Home(home, f"{lan}.2", router=far, router_wan_ip=wan_ip))
            if not nat:  # every public subnet reachable from the bridge through its router
                for i, h in enumerate(topo.homes):
                    subnet, via = f"{net16}.{1 + i}.0/24", h.router_wan_ip
                    _sh("ip", "-n", pub, "route", "add", subnet, "via", via)
                    _sh("ip", "route", "add", subnet, "via", via)  # the harness too
                    uplinks.append(f"route:{subnet}")
                    for other in topo.homes:
                        if other is not h:
                            _sh("ip", "-n", other.router, "route", "add", subnet, "via", via)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            _unavailable(f"cannot set up the NAT namespaces here: {exc}", skip)
        yield topo
    finally:
        for name in reversed(created):  # deleting a namespace deletes its veth ends
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        for dev in uplinks:  # gone with the public namespace already, normally
            if dev.startswith("route:"):
                subprocess.run(["ip", "route", "del", dev.removeprefix("route:")], capture_output=True, timeout=20)
            else:
                subprocess.run(["ip", "link", "del", dev], capture_output=True, timeout=20)
