"""The HTTP API through FastAPI's TestClient: real PNG and DICOM uploads, heatmaps, limits, 4xx, 503."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from chexfound.data.findings import NIH14
from chexfound.serve import Predictor
from chexfound.serve.app import ServeSettings, create_app


@pytest.fixture(scope="module")
def linear_predictor(models: dict[str, Path]) -> Predictor:
    return Predictor(models["backbone"], models["linear"], device="cpu")


@pytest.fixture(scope="module")
def attention_predictor(models: dict[str, Path]) -> Predictor:
    return Predictor(models["backbone"], models["attention"], device="cpu")


@pytest.fixture(scope="module")
def client(attention_predictor: Predictor):
    with TestClient(create_app(attention_predictor, ServeSettings(max_wait_ms=1))) as c:
        yield c


def post(client: TestClient, path: Path, name: str | None = None, **params: str):
    with open(path, "rb") as f:
        return client.post("/v1/predict", params=params, files={"file": (name or path.name, f)})


def png_image(content: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(content))
    im.load()
    return im


def test_health_model_and_spec(client: TestClient, attention_predictor: Predictor) -> None:
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["in_flight"] == 0
    m = client.get("/v1/model").json()
    assert m["findings"] == list(NIH14)
    assert m["backbone"]["weights_sha256"] == attention_predictor.backbone_sha256
    assert m["head"]["has_attention"] is True and m["transform"]["size"] == 64
    assert m["limits"]["max_upload_bytes"] == ServeSettings().max_upload_bytes
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/healthz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert client.head("/").status_code == 200 and client.head("/healthz").status_code == 200  # uptime checks
    assert client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize("kind", ["png", "dicom"])
def test_predict_real_files(client: TestClient, attention_predictor: Predictor, png_paths: list[Path],
                            dicom_paths: list[Path], kind: str) -> None:
    path = png_paths[0] if kind == "png" else dicom_paths[0]
    r = post(client, path)
    assert r.status_code == 200, r.text
    body = r.json()
    names = [f["name"] for f in body["findings"]]
    assert names == list(NIH14)
    expected = attention_predictor.predict_image(path).probabilities
    np.testing.assert_allclose([f["probability"] for f in body["findings"]], expected, atol=1e-5)
    assert body["positive"] == [f["name"] for f in body["findings"] if f["positive"]]
    assert all(f["positive"] == (f["probability"] >= f["threshold"]) for f in body["findings"])
    assert body["image"]["filename"] == path.name and body["image"]["bytes"] == path.stat().st_size
    assert body["model"]["backbone_sha256"] == attention_predictor.backbone_sha256
    assert body["heatmaps"]["available"] is True and body["heatmaps"]["kind"] == "glori_attention"
    # Without ?heatmaps= nothing is cached and no heatmap fields are sent.
    # (Every finding says which rule chose its threshold: chexfound.stats.thresholds.)
    assert "id" not in body and all(set(f) == {"name", "probability", "threshold", "positive", "threshold_rule",
                                               "threshold_reason"} for f in body["findings"])


def test_heatmap_urls(client: TestClient, png_paths: list[Path]) -> None:
    body = post(client, png_paths[1], heatmaps="url").json()
    assert body["id"]
    img = client.get(body["image"]["image_url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    base = np.asarray(png_image(img.content))
    assert base.shape == (512, 512)  # the 64-px model's view, shown at the page's 512 px
    top = max(body["findings"], key=lambda f: f["probability"])
    r = client.get(top["heatmap_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    over = np.asarray(png_image(r.content).convert("RGB")).astype(int)
    assert over.shape == (512, 512, 3)
    colour = np.abs(over[..., 0] - over[..., 2]) + np.abs(over[..., 1] - over[..., 2])
    assert (colour > 40).mean() > 0.05  # a coloured heatmap over a grayscale image
    # Two findings attend differently (the maps are not a constant decoration).
    other = min(body["findings"], key=lambda f: f["probability"])
    over2 = np.asarray(png_image(client.get(other["heatmap_url"]).content).convert("RGB")).astype(int)
    assert np.abs(over - over2).mean() > 1.0
    assert client.get(f"/v1/predictions/{body['id']}/heatmap.png", params={"finding": "Dragons"}).status_code == 404
    assert client.get("/v1/predictions/0123abcd/image.png").status_code == 404


def test_heatmaps_base64_top_k(client: TestClient, png_paths: list[Path]) -> None:
    body = post(client, png_paths[2], heatmaps="base64", top_k="2").json()
    with_maps = [f for f in body["findings"] if f.get("heatmap_png")]
    ranked = sorted(body["findings"], key=lambda f: -f["probability"])
    assert [f["name"] for f in with_maps] == sorted([f["name"] for f in ranked[:2]], key=list(NIH14).index)
    im = png_image(base64.b64decode(with_maps[0]["heatmap_png"]))
    assert im.size == (512, 512) and im.mode == "RGB"


def test_head_without_attention_has_maps_that_say_their_kind(linear_predictor: Predictor,
                                                             png_paths: list[Path]) -> None:
    with TestClient(create_app(linear_predictor)) as c:
        body = post(c, png_paths[0], heatmaps="url").json()
        # A linear avgpool head: its exact per-patch logit shares (chexfound.adapt.attribution).
        assert body["heatmaps"]["available"] is True
        assert body["heatmaps"]["kind"] == "linear_patch_contribution"
        assert "patch contributions" in body["heatmaps"]["description"]
        assert all(f.get("heatmap_url") for f in body["findings"])
        r = c.get(f"/v1/predictions/{body['id']}/heatmap.png", params={"finding": "Mass"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        model = c.get("/v1/model").json()["head"]
        assert model["has_attention"] is False and model["heatmap_kind"] == "linear_patch_contribution"


def test_unreadable_uploads_get_clear_4xx(client: TestClient, not_an_image: Path, tmp_path: Path) -> None:
    r = post(client, not_an_image, name="scan.dcm")
    assert r.status_code == 400
    assert r.json()["detail"].startswith("scan.dcm: not a readable chest X-ray")
    assert str(tmp_path) not in r.text and "chexfound-upload" not in r.text  # no server paths leak
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    r = post(client, empty)
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    assert client.post("/v1/predict").status_code == 422  # no `file` field
    assert client.post("/v1/predict", params={"heatmaps": "svg"},
                       files={"file": ("a.png", b"x")}).status_code == 422


def test_upload_and_dimension_limits(attention_predictor: Predictor, png_paths: list[Path],
                                     small_png: Path) -> None:
    size = png_paths[0].stat().st_size
    with TestClient(create_app(attention_predictor, ServeSettings(max_upload_bytes=size // 4))) as c:
        r = post(c, png_paths[0])
        assert r.status_code == 413 and "too large" in r.json()["detail"]
        # A streamed (chunked) body has no Content-Length to check up front: refused before it is read.
        r = c.post("/v1/predict", content=iter([b"x" * 10]), headers={"content-type": "multipart/form-data"})
        assert r.status_code == 411
    with TestClient(create_app(attention_predictor, ServeSettings(max_image_side=256))) as c:
        r = post(c, small_png)  # 512 x 512
        assert r.status_code == 413 and "512x512" in r.json()["detail"]


def test_full_queue_answers_503(attention_predictor: Predictor, small_png: Path) -> None:
    with TestClient(create_app(attention_predictor, ServeSettings(queue_size=2))) as c:
        batcher = c.app.state.batcher
        held = [batcher.reserve() for _ in range(2)]  # two requests in flight
        try:
            r = post(c, small_png)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "busy" in r.json()["detail"]
        finally:
            for s in held:
                s.release()
        assert post(c, small_png).status_code == 200
        assert c.get("/healthz").json()["batcher"]["rejected"] == 1


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no real pixel data): checks must refuse it before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side, message", [(10000, "10000x10000"), (40000, "decompression bomb")])
def test_huge_images_refused_from_their_header(client: TestClient, side: int, message: str) -> None:
    r = client.post("/v1/predict", files={"file": ("huge.png", png_header_only(side, side))})
    assert r.status_code == 413
    assert message in r.json()["detail"]


def test_security_headers_on_every_response(client: TestClient, attention_predictor: Predictor,
                                            png_paths: list[Path], not_an_image: Path) -> None:
    from chexfound.serve.middleware import SECURITY_HEADERS

    responses = {"page": client.get("/"), "script": client.get("/static/app.js"), "model": client.get("/v1/model"),
                 "docs": client.get("/docs"), "spec": client.get("/openapi.json"),
                 "missing": client.get("/v1/predictions/0123abcd/image.png"),
                 "bad upload": post(client, not_an_image), "prediction": post(client, png_paths[0])}
    with TestClient(create_app(attention_predictor, ServeSettings(max_upload_bytes=10))) as small:
        responses["413 from the size gate"] = post(small, png_paths[0])
    for what, r in responses.items():
        for name, value in SECURITY_HEADERS.items():
            assert r.headers.get(name) == value, (what, name, r.headers.get(name))
    csp = SECURITY_HEADERS["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert SECURITY_HEADERS["x-content-type-options"] == "nosniff"
    # The page itself satisfies its policy: no inline script or style, no style attributes, nothing remote.
    page = responses["page"].text
    assert "<script>" not in page and "<style" not in page and " style=" not in page and "http" not in page
    assert '<script src="/static/app.js"></script>' in page


def test_docs_is_our_own_offline_api_reference(client: TestClient) -> None:
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for path in ("/v1/predict", "/v1/model", "/healthz", "/v1/predictions/{pid}/heatmap.png"):
        assert f"<code>{path}</code>" in html
    assert "heatmaps" in html and "top_k" in html and "file" in html  # parameters and the multipart field
    assert "<script" not in html and "cdn" not in html.lower() and "http://" not in html and "https://" not in html
    assert client.get("/redoc").status_code == 404  # Redoc, like Swagger UI, would need a CDN


def test_unreadable_upload_says_which_kind(client: TestClient, data_root: Path) -> None:
    cut = (data_root / "dicom" / "RG1_J2KI.dcm").read_bytes()[:200_000]
    r = client.post("/v1/predict", files={"file": ("cut.dcm", cut)})
    assert r.status_code == 400 and r.json()["kind"] == "truncated"
    assert r.json()["detail"].startswith("cut.dcm: not a readable chest X-ray: truncated pixel data")
    noise = np.random.default_rng(0).integers(0, 256, 100, dtype=np.uint8).tobytes()
    r = client.post("/v1/predict", files={"file": ("noise.dcm", noise)})
    assert r.status_code == 400 and r.json()["kind"] == "not_an_image"
    assert "object at 0x" not in r.text and "no pixel data" not in r.text
