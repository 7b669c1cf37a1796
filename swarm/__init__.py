"""swarm: pool volunteer GPUs over ordinary internet links to train and serve language models.

Importing this package starts nothing and configures no logging.
"""

__version__ = "0.1.0"

# Protocol version spoken between nodes and the coordinator. Bump the major part on any
# incompatible change of the wire protocol; the coordinator refuses other majors.
PROTOCOL_VERSION = "1.0"
