"""One small aiohttp server per worker, beside the engine (never on its hot path).

* ``GET /livez``: 200 while the process runs; it never depends on restores or
  rebalances, so a long restore never gets a pod killed;
* ``GET /readyz``: 200 when every assigned task has restored and the group is
  not rebalancing, 503 (with what is pending) otherwise;
* ``GET /metrics``: Prometheus text (see :mod:`stream_app.web.metrics`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from stream_app import json
from stream_app.web.metrics import EngineCollector

if TYPE_CHECKING:
    from stream_app.pipeline.engine import Engine
    from stream_app.settings import Settings

log = logging.getLogger(__name__)


class WebServer:
    """Serves the probes and metrics of ``engine``."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(engine))
        self.app = web.Application()
        self.app.router.add_get("/livez", self.livez)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", self.metrics)
        self._runner: web.AppRunner | None = None
        #: The bound port (the setting may be 0: any free port).
        self.port = settings.http_port

    async def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.http_host, self.settings.http_port)
        await site.start()
        for address in self._runner.addresses:
            self.port = int(address[1])
            break
        log.info("serving /livez /readyz /metrics on %s:%d", self.settings.http_host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def livez(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, _request: web.Request) -> web.Response:
        status = self.engine.status()
        return web.Response(
            body=json.dumps(status),
            status=200 if status["ready"] else 503,
            content_type="application/json",
        )

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
