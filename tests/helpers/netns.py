"""Network namespaces joined by a veth pair whose both directions are shaped with ``tc tbf``.

    with shaped_pair(rate="100mbit") as net:
        net.prefix_a  # ["ip", "netns", "exec", <ns a>]: prefix a command to run it inside namespace a
        net.ip_a, net.ip_b

Skips the calling test (pytest.skip) when not root or ``ip``/``tc`` are missing or namespaces
cannot be created; with ``skip=False`` (benchmarks) raises :class:`NetnsUnavailable` instead. Names carry the pid so concurrent test runs do not collide; everything is
deleted on exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass



class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be used here (not root, no iproute2, no kernel support)."""


def _unavailable(reason: str, skip: bool):
    if skip:
        import pytest

        pytest.skip(reason)
    raise NetnsUnavailable(reason)


@dataclass(frozen=True)
class NetnsPair:
    ns_a: str
    ns_b: str
    ip_a: str
    ip_b: str
    dev_a: str
    dev_b: str

    @property
    def prefix_a(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns_a]

    @property
    def prefix_b(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns_b]


def _run(*argv: str) -> None:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {out.stderr.strip()}")


def netns_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2)"
    return None


@contextmanager
def shaped_pair(*, rate: str = "100mbit", burst: str = "32kbit", latency: str = "400ms", subnet: int | None = None,
                skip: bool = True):
    reason = netns_unavailable_reason()
    if reason:
        _unavailable(reason, skip)
    tag = f"{os.getpid() % 100000}"
    subnet = subnet if subnet is not None else 1 + os.getpid() % 250
    pair = NetnsPair(ns_a=f"swa{tag}", ns_b=f"swb{tag}", ip_a=f"10.213.{subnet}.1", ip_b=f"10.213.{subnet}.2",
                     dev_a=f"vsa{tag}", dev_b=f"vsb{tag}")
    created: list[str] = []
    try:
        try:
            for ns in (pair.ns_a, pair.ns_b):
                _run("ip", "netns", "add", ns)
                created.append(ns)
            _run("ip", "link", "add", pair.dev_a, "type", "veth", "peer", "name", pair.dev_b)
            for ns, dev, ip in ((pair.ns_a, pair.dev_a, pair.ip_a), (pair.ns_b, pair.dev_b, pair.ip_b)):
                _run("ip", "link", "set", dev, "netns", ns)
                _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                     "rate", rate, "burst", burst, "latency", latency)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            _unavailable(f"cannot set up network namespaces here: {exc}", skip)
        yield pair
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
