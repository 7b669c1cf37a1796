"""The swarm node: a volunteer's agent (identity, hardware probe, peer service, heartbeats,
link measurement) plus plugins for training and inference. Start one with ``swarm-node join``
(:mod:`node.cli`) or in-process with :class:`node.agent.NodeAgent`.
"""
