"""How a node's calls to the coordinator carry its identity.

After a signed registration the coordinator issues a session secret; every later call from
the node carries gRPC metadata ``swarm-node-id`` and ``swarm-session``. Plugins on the node
get it from ``NodeAgent.call_metadata()``; servicers on the coordinator check it with
``CoordinatorApp.authenticate_node(context)``. A user's state-changing calls carry
``swarm-api-token``, checked with ``CoordinatorApp.authenticate_user(context, action)``.
These secrets only ever travel inside TLS (swarm/transport/tls.py); calls between nodes (and
from the coordinator to nodes) are authenticated by client certificates instead.
"""

from __future__ import annotations

import hmac

NODE_ID_KEY = "swarm-node-id"
SESSION_KEY = "swarm-session"
MAX_SESSION_CHARS = 128
# A user's calls that change what the swarm runs (submit/cancel a job, serve/unserve a model)
# carry the coordinator's token in this metadata key.
API_TOKEN_KEY = "swarm-api-token"
MAX_API_TOKEN_CHARS = 320  # swarm1.<64 hex>.<secret of up to 200>


def api_token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((API_TOKEN_KEY, token),) if token else ()


def token_matches(given: str, expected: str) -> bool:
    """Whether a presented token (a node's join token or a user's API token) is the coordinator's.
    Constant-time; False when empty, oversized or when the coordinator has no token."""
    if not given or not expected or len(given) > MAX_API_TOKEN_CHARS:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def read_api_token(context) -> str:
    """The user's API token from a servicer context's metadata; empty when absent."""
    for key, value in context.invocation_metadata() or ():
        if key == API_TOKEN_KEY and isinstance(value, str):
            return value
    return ""


def call_metadata(node_id: str, session: str) -> tuple[tuple[str, str], ...]:
    return ((NODE_ID_KEY, node_id), (SESSION_KEY, session))


def read_credentials(context) -> tuple[str, str]:
    """(node_id, session) from a servicer context's metadata; empty strings when absent."""
    node_id = session = ""
    for key, value in context.invocation_metadata() or ():
        if key == NODE_ID_KEY and isinstance(value, str):
            node_id = value
        elif key == SESSION_KEY and isinstance(value, str):
            session = value
    return node_id, session
