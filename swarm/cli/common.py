"""Flags every command that talks to a coordinator shares, and the one place they are resolved.

``--coordinator HOST:PORT`` and ``--token TOKEN`` resolve the same way for every command
(``swarm status/train/jobs/job/cancel/serve/models/unserve/generate`` and ``swarm-node join``):
the flag, else ``$SWARM_COORDINATOR`` / ``$SWARM_TOKEN``, else the default (``127.0.0.1:7070``;
no token). Which token: ``swarm-node join`` takes the join token; commands that change what the
swarm runs (train, cancel, serve, unserve) the admin token; commands that read (status, jobs, job,
models, generate) the read token or the admin token. ``--json`` prints one JSON object instead of
text, on every command that prints state.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the client imports grpc: only loaded when a command runs
    from swarm.transport.coordinator_client import CoordinatorClient

DEFAULT_COORDINATOR = "127.0.0.1:7070"
COORDINATOR_ENV = "SWARM_COORDINATOR"
TOKEN_ENV = "SWARM_TOKEN"


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorTarget:
    """Where to reach the coordinator and with which token (None: no token)."""

    address: str
    token: str | None

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("the coordinator address is empty; pass --coordinator HOST:PORT")


def add_common_flags(parser: argparse.ArgumentParser, *, token: bool = True, json: bool = False,
                     json_help: str = "print JSON instead of text") -> None:
    """Declare ``--coordinator``, ``--token`` (unless ``token=False``) and ``--json`` (if ``json``)."""
    parser.add_argument("--coordinator", default=None,
                        help=f"HOST:PORT of the coordinator's gRPC port (default ${COORDINATOR_ENV}, "
                             f"else {DEFAULT_COORDINATOR})")
    if token:
        parser.add_argument("--token", default=None,
                            help=f"the coordinator's token as swarm-coordinator serve printed it (default ${TOKEN_ENV}): "
                                 "the admin token (admin_token=) to submit/cancel jobs and serve/unserve models, "
                                 "the read token (read_token=) or the admin token to read")
    if json:
        parser.add_argument("--json", action="store_true", help=json_help)


def resolve_coordinator(coordinator: str | None, token: str | None,
                        env: Mapping[str, str] | None = None) -> CoordinatorTarget:
    """Flag, else environment, else default -- for the address and the token alike."""
    env = os.environ if env is None else env
    address = coordinator or env.get(COORDINATOR_ENV) or DEFAULT_COORDINATOR
    return CoordinatorTarget(address=address, token=token or env.get(TOKEN_ENV) or None)


def target_from_args(args: argparse.Namespace) -> CoordinatorTarget:
    return resolve_coordinator(getattr(args, "coordinator", None), getattr(args, "token", None))


def connect(args: argparse.Namespace, *, timeout_s: float = 30.0) -> CoordinatorClient:
    """A client for the coordinator the parsed flags name. Raises ConfigError for a bad address."""
    from swarm.transport.coordinator_client import CoordinatorClient

    target = target_from_args(args)
    return CoordinatorClient(target.address, token=target.token, timeout_s=timeout_s)
