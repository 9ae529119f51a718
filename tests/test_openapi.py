"""docs/openapi.yaml describes exactly the routes the worker serves."""

from __future__ import annotations

from pathlib import Path

import yaml

from stream_app.pipeline.engine import Engine
from stream_app.pipeline.topics import TopicLayout
from stream_app.settings import Settings
from stream_app.web.server import WebServer

ROOT = Path(__file__).resolve().parents[1]


def test_the_openapi_document_lists_every_route_the_server_has(tmp_path: Path) -> None:
    document = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
    documented = {
        (path.replace("{integrationId}", "{integration_id}"), method.upper())
        for path, operations in document["paths"].items()
        for method in operations
    }
    settings = Settings(data_dir=tmp_path)
    server = WebServer(settings, Engine(settings, TopicLayout(4, 1_048_588)))
    served = {
        (route.resource.canonical, route.method)
        for route in server.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert served == documented
