"""The swarm coordinator: registry, liveness, network matrices, plugins (jobs, inference, web).

Start one with ``swarm-coordinator serve`` (:mod:`coordinator.cli`) or in-process with
:class:`coordinator.app.CoordinatorApp`.
"""
