"""Renders every overlay of deploy/ once per session (kustomize via kubectl)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.manifests import DEPLOY, Rendering, kustomize, kustomize_with_component

#: Overlays as they are, and the optional components that no overlay includes,
#: each rendered on top of prod. tests/deploy/test_render.py checks this covers
#: every overlay and component directory.
OVERLAYS = ("dev", "prod")
EXTRA_COMPONENTS = {"prod+mtls": ("prod", "mtls")}
VARIANTS = OVERLAYS + tuple(EXTRA_COMPONENTS)


@pytest.fixture(scope="session")
def renderings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendering]:
    rendered = {name: Rendering(name, kustomize(DEPLOY / "overlays" / name)) for name in OVERLAYS}
    for name, (overlay, component) in EXTRA_COMPONENTS.items():
        tmp: Path = tmp_path_factory.mktemp(name.replace("+", "-"))
        rendered[name] = Rendering(name, kustomize_with_component(tmp, overlay, component))
    return rendered


@pytest.fixture(params=VARIANTS)
def rendering(request: pytest.FixtureRequest, renderings: dict[str, Rendering]) -> Rendering:
    return renderings[request.param]
