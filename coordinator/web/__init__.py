"""The coordinator's web status page (a coordinator plugin, see :mod:`coordinator.plugins`).

``create(host)`` returns a plugin whose ``install_http(web_app)`` adds, all read-only (GET/HEAD only):

- ``/``: a single static page (``static/index.html`` + plain JS) that polls the JSON API every
  few seconds and draws nodes, network heatmaps, the plan as a pipeline and the jobs;
- ``/static/{file}``: its JS/CSS, including ``minichart.js``, our own small SVG chart code
  (served from the package: no CDN, the page works offline);
- ``/api/plan``: the running job's plan, else a cached preview plan of the online nodes for a
  small default job, else ``source: "none"`` (:mod:`coordinator.web.plan_view`);
- ``/metrics``: Prometheus text format (:mod:`coordinator.web.metrics`).

``/api/nodes`` and ``/api/network`` are the coordinator's own routes (:mod:`coordinator.http`);
``/api/jobs`` and ``/api/jobs/{id}`` belong to the jobs plugin, whose records (typed by
:class:`swarm.job_detail.JobDetail`) the page reads through ``host.services.jobs``. Values that nodes send (names
above all) are inserted into the page with ``textContent`` only, and the page is served with a
Content-Security-Policy that forbids inline scripts, so a hostile name stays text.
"""

from __future__ import annotations

from aiohttp import web

from coordinator.plugins import CoordinatorHost, CoordinatorPlugin
from coordinator.web.plan_view import PreviewConfig
from coordinator.web.routes import install_http


class WebPlugin(CoordinatorPlugin):
    def __init__(self, host: CoordinatorHost, *, preview_config: PreviewConfig | None = None) -> None:
        self.host = host
        self.preview_config = preview_config

    def install_http(self, web_app: web.Application) -> None:
        install_http(web_app, self.host, preview_config=self.preview_config)


def create(host: CoordinatorHost) -> WebPlugin:
    return WebPlugin(host)


__all__ = ["WebPlugin", "create", "install_http"]
