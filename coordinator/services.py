"""Services coordinator plugins expose to each other, one typed slot per service.

A plugin provides its service from its ``create(host)`` factory; other plugins look it up through
``host.services`` when they need it (in ``start`` or in a request handler), never in their own
factory: the order of ``PLUGINS`` is not a dependency order. A slot is None while no plugin
provides it (the plugin is not installed), and readers must handle that.

The slots are typed by the Protocols below, which say what *other plugins* may use; the
providing plugin may offer more to its own code (and tests may reach the concrete object).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol

from swarm.errors import ConfigError

if TYPE_CHECKING:
    from swarm.job_detail import JobDetail


class JobsService(Protocol):
    """What the jobs plugin (``coordinator.jobs``) offers other plugins."""

    def job_details(self, *, states: tuple[str, ...] | None = None, limit: int = 200) -> list[JobDetail]:
        """The newest ``limit`` jobs (optionally only in ``states``), newest first. Reads SQLite:
        call it from a worker thread, not the event loop."""
        ...


class InferenceService(Protocol):
    """What the inference plugin (``coordinator.inference``) offers other plugins."""

    def models(self) -> list[Any]:
        """The served models (``coordinator.inference.engine.ServedModel``)."""
        ...


class Services:
    """The registry of plugin services of one coordinator; safe to use from any thread."""

    __slots__ = ("_lock", "_jobs", "_inference")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: JobsService | None = None
        self._inference: InferenceService | None = None

    def provide_jobs(self, service: JobsService) -> None:
        with self._lock:
            if self._jobs is not None:
                raise ConfigError("two plugins provide the jobs service; list only one in the plugin list")
            self._jobs = service

    def provide_inference(self, service: InferenceService) -> None:
        with self._lock:
            if self._inference is not None:
                raise ConfigError("two plugins provide the inference service; list only one in the plugin list")
            self._inference = service

    @property
    def jobs(self) -> JobsService | None:
        with self._lock:
            return self._jobs

    @property
    def inference(self) -> InferenceService | None:
        with self._lock:
            return self._inference
