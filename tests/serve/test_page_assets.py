"""The service's spec and page hold together: every OpenAPI operation id is unique, and every asset the page and
the API reference link (favicon included) is served."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from chexfound.serve import Predictor
from chexfound.serve.app import ServeSettings, create_app


@pytest.fixture(scope="module")
def client(models: dict[str, Path]):
    with TestClient(create_app(Predictor(models["backbone"], models["linear"], device="cpu"),
                               ServeSettings(max_wait_ms=1))) as c:
        yield c


def test_operation_ids_are_unique_over_the_whole_spec(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()
           if isinstance(op, dict) and "operationId" in op]
    assert ids and not [i for i, n in Counter(ids).items() if n > 1]
    assert "head" not in spec["paths"]["/healthz"]  # HEAD answers (below) but is not a second operation
    assert client.head("/healthz").status_code == 200


@pytest.mark.parametrize("page", ["/", "/docs"])
def test_every_linked_asset_is_served(client: TestClient, page: str) -> None:
    html = client.get(page).text
    links = set(re.findall(r'(?:href|src)="(/[^"]*)"', html))
    assert "/static/favicon.svg" in links
    for link in sorted(links):
        r = client.get(link)
        assert r.status_code == 200, f"{page} links {link}: {r.status_code}"
    icon = client.get("/favicon.ico")  # what browsers ask for on pages that link none
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.content.startswith(b"<svg")
