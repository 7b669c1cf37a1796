"""swarm: pool volunteer GPUs over ordinary internet links to train and serve language models.

Importing this package starts nothing and configures no logging. It does turn gRPC's fork
handlers off (``GRPC_ENABLE_FORK_SUPPORT=0``, unless the environment already says otherwise),
before anything imports grpc: a node forks hivemind's DHT and averager processes while its gRPC
threads run; the forked children never use gRPC, and the handlers, which try to pause those
threads around the fork, deadlocked now and then -- the parent (its heartbeats stopped) or the
child (the averager never became ready) -- on a loaded 2-core box.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

__version__ = "0.1.0"

# Protocol version spoken between nodes and the coordinator. Bump the major part on any
# incompatible change of the wire protocol; the coordinator refuses other majors.
PROTOCOL_VERSION = "1.0"
