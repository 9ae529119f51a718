"""Renders every overlay of deploy/ once per session (kustomize via kubectl)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_app.pipeline.topics import topic_specs
from tests.deploy.manifests import DEPLOY, Rendering, kustomize, kustomize_with_component

#: Overlays as they are, and the optional components that no overlay includes,
#: each rendered on top of prod. tests/deploy/test_render.py checks this covers
#: every overlay and component directory.
OVERLAYS = ("dev", "prod", "prod-v2")
EXTRA_COMPONENTS = {"prod+mtls": ("prod", "mtls")}
VARIANTS = OVERLAYS + tuple(EXTRA_COMPONENTS)
#: Overlays applied to the namespace of another, beside it: prod-v2, a second
#: app id (docs/operations.md, "Migrate: a new app id"), reads the command and
#: settings topics whose KafkaTopics are prod's.
BESIDE = {"prod-v2": "prod"}


def with_shared_topics(overlay: Rendering, beside: Rendering) -> Rendering:
    """``overlay`` with the KafkaTopics of ``beside`` for the topics its worker
    uses and it does not own, as the namespace has them."""
    used = {spec.name for spec in topic_specs(overlay.settings(), 1)}
    own = overlay.kafka_topics()
    shared = [doc for name, doc in beside.kafka_topics().items() if name in used - own.keys()]
    return Rendering(overlay.name, [*overlay.docs, *shared])


@pytest.fixture(scope="session")
def overlay_renderings() -> dict[str, Rendering]:
    """Every overlay as kustomize renders it, alone."""
    return {name: Rendering(name, kustomize(DEPLOY / "overlays" / name)) for name in OVERLAYS}


@pytest.fixture(scope="session")
def renderings(
    overlay_renderings: dict[str, Rendering], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Rendering]:
    """Every variant. An overlay of BESIDE comes with the other's KafkaTopics
    that it uses, so that the policies about topics hold for it as for the
    others; tests/deploy/test_migrate.py checks that it owns none of them."""
    rendered = {
        name: with_shared_topics(r, overlay_renderings[BESIDE[name]]) if name in BESIDE else r
        for name, r in overlay_renderings.items()
    }
    for name, (overlay, component) in EXTRA_COMPONENTS.items():
        tmp: Path = tmp_path_factory.mktemp(name.replace("+", "-"))
        rendered[name] = Rendering(name, kustomize_with_component(tmp, overlay, component))
    return rendered


@pytest.fixture(params=VARIANTS)
def rendering(request: pytest.FixtureRequest, renderings: dict[str, Rendering]) -> Rendering:
    return renderings[request.param]
