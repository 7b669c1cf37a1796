"""The error hierarchy of swarm.

Every error raised on purpose by swarm derives from :class:`SwarmError`. Subclasses say
whether retrying can help (:class:`RetryableError`) or not. Messages say what to do.
Servicers translate these into gRPC status codes in one table (``swarm.transport.errors``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


class SwarmError(Exception):
    """Root of all swarm errors."""

    retryable: bool = False


class RetryableError(SwarmError):
    """A transient failure: the same call may succeed later (peer busy, link down)."""

    retryable = True


class InvalidRequestError(SwarmError):
    """A request or input is malformed, out of range or inconsistent. Fix the input."""


class ConfigError(InvalidRequestError):
    """A configuration value (flag, file, env var) is invalid."""


class WrongProtocolError(ConfigError):
    """The address answers another protocol (HTTP/1 where gRPC was expected): retrying cannot
    help, the address must change."""


class AuthError(SwarmError):
    """Wrong token, bad signature or unknown identity."""


class PermissionDeniedError(AuthError):
    """The caller is known but not allowed to do this."""


class VersionMismatchError(SwarmError):
    """Peers speak incompatible protocol versions. Upgrade the older side."""


class NotFoundError(SwarmError):
    """The named node, job, model or session does not exist."""


class CapacityError(SwarmError):
    """Not enough memory, nodes or disk for what was asked."""


class InfeasiblePlanError(CapacityError):
    """No plan satisfies the job's constraints (memory, device count)."""


class PeerError(RetryableError):
    """A peer is unreachable, timed out or misbehaved."""


class UnavailableError(RetryableError):
    """A service (coordinator, peer) cannot be reached right now."""


@contextmanager
def shown_as(base: str | os.PathLike, shown: str = "") -> Iterator[None]:
    """Re-raise a SwarmError whose message names files under ``base`` (a server's internal
    directory) with those names as the user gave them: ``base/data/x.txt`` -> ``{shown}data/x.txt``."""
    try:
        yield
    except SwarmError as exc:
        prefix = os.fspath(base).rstrip("/")
        msg = str(exc)
        if prefix not in msg:
            raise
        new = type(exc)(msg.replace(prefix + "/", shown).replace(prefix, shown.rstrip("/") or "the upload"))
        raise new from exc
