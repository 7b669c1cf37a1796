"""How a node's calls to the coordinator carry its identity.

After a signed registration the coordinator issues a session secret; every later call from
the node carries gRPC metadata ``swarm-node-id`` and ``swarm-session``. Plugins on the node
get it from ``NodeAgent.call_metadata()``; servicers on the coordinator check it with
``CoordinatorApp.authenticate_node(context)``.
"""

from __future__ import annotations

NODE_ID_KEY = "swarm-node-id"
SESSION_KEY = "swarm-session"
MAX_SESSION_CHARS = 128


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
