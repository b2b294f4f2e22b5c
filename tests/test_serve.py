"""The web service: responses, hostile uploads and their status codes, the bounded queue, no patient data out."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import struct
import tempfile
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import SIZE, blocked_predictor, chest_like, dicom_bytes, make_checkpoint, png_bytes, png_chunk
from PIL import Image

from cxrdx import __version__
from cxrdx.dicom_privacy import scrub_patient_values
from cxrdx.findings import FINDINGS
from cxrdx.predict import Predictor
from cxrdx.serve import create_app

LIMIT = 256 * 2**10
PATIENT = ("Doe^Jane", "PID-7731-SECRET")


def jpeg_bytes(img: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=90)
    return out.getvalue()


def png_bomb(side: int) -> bytes:
    """A valid gray PNG of side x side zeros: small on the wire, side² bytes once decoded."""
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header announcing huge dimensions, followed by a tiny (wrong) IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 100)) + png_chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to announce huge dimensions."""
    data = bytearray(jpeg_bytes(chest_like(32)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def dicom_claiming(rows: int, columns: int) -> bytes:
    data = dicom_bytes(chest_like(16))
    # Rows (0028,0010) and Columns (0028,0011), explicit VR little endian, US, 2 bytes each.
    for tag, value in ((b"\x28\x00\x10\x00US\x02\x00", rows), (b"\x28\x00\x11\x00US\x02\x00", columns)):
        at = data.index(tag) + len(tag)
        data = data[:at] + struct.pack("<H", value) + data[at + 2 :]
    return data


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    path = make_checkpoint(
        tmp_path_factory.mktemp("serve") / "best.pt",
        val_metrics={"auc": {"mean": 0.81, "Hernia": float("nan")}, "epoch": np.int64(3)},
        thresholds=[0.3] * len(FINDINGS),
    )
    return Predictor.from_checkpoint(path, device="cpu")


@pytest.fixture(scope="module")
def client(predictor: Predictor):
    with TestClient(
        create_app(predictor, max_upload_bytes=LIMIT, queue_size=4), raise_server_exceptions=False, base_url="http://localhost"
    ) as c:
        yield c


def upload(client: TestClient, data: bytes, path: str = "/v1/predict", name: str = "x.png", **params):
    return client.post(path, params=params, files={"file": (name, data, "application/octet-stream")})


def test_predict_returns_the_probabilities_of_the_predictor(client: TestClient, predictor: Predictor) -> None:
    data = png_bytes(chest_like(100))
    response = upload(client, data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "test_resnet" and body["backend"] == "pytorch" and body["cxrdx_version"] == __version__
    assert list(body["probabilities"]) == list(FINDINGS)
    expected = predictor.predict_proba(data)[0]
    assert np.abs(np.array(list(body["probabilities"].values())) - expected).max() <= 1e-6
    assert body["thresholds"] == dict.fromkeys(FINDINGS, 0.3)
    assert body["positives"] == [f for f in FINDINGS if body["probabilities"][f] >= 0.3]
    assert "image" not in body


def test_predict_accepts_jpeg_dicom_rgba_and_raw_bodies(client: TestClient) -> None:
    img = chest_like(90)
    for data in (jpeg_bytes(img), dicom_bytes(img.astype(np.uint16) * 257, "MONOCHROME2"), png_bytes(img, "RGBA")):
        assert upload(client, data, name="no-extension").status_code == 200
    raw = client.post("/v1/predict", content=png_bytes(img), headers={"content-type": "application/octet-stream"})
    assert raw.status_code == 200 and len(raw.json()["probabilities"]) == len(FINDINGS)


def test_predict_can_return_the_model_view(client: TestClient) -> None:
    body = upload(client, png_bytes(chest_like(100)), image="true").json()
    prefix = "data:image/png;base64,"
    assert body["image"].startswith(prefix)
    view = Image.open(io.BytesIO(base64.b64decode(body["image"][len(prefix) :])))
    assert view.size == (SIZE, SIZE)


HOSTILE = {
    "zero bytes": (b"", 400),
    "text named .png": (b"hello, I am not an image at all", 415),
    "GIF": (b"GIF89a" + bytes(64), 415),
    "PDF": (b"%PDF-1.4\n" + bytes(64), 415),
    "PNG signature only": (b"\x89PNG\r\n\x1a\n", 422),
    "truncated PNG": (png_bytes(chest_like(120))[:900], 422),
    "truncated JPEG": (jpeg_bytes(chest_like(120))[:700], 422),
    "PNG claiming 100000 x 100000": (png_claiming(100_000, 100_000), 422),
    "PNG decompression bomb 8000 x 8000": (png_bomb(8000), 422),
    "JPEG claiming 65000 x 65000": (jpeg_claiming(65_000, 65_000), 422),
    "DICOM without pixel data": (dicom_bytes(chest_like(32), pixel_data=False), 422),
    "DICOM claiming 65535 x 65535": (dicom_claiming(65_535, 65_535), 422),
    "DICOM with short pixel data": (dicom_claiming(500, 500), 422),
    "DICOM preamble then garbage": (bytes(128) + b"DICM" + b"\xff" * 300, 422),
    "over the size limit": (b"\x89PNG\r\n\x1a\n" + bytes(LIMIT), 413),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_uploads_get_their_status_code(client: TestClient, case: str) -> None:
    data, status = HOSTILE[case]
    response = upload(client, data)
    assert response.status_code == status, response.text
    assert response.json()["detail"]  # a message a person can act on
    explained = upload(client, data, path="/v1/explain", finding="Effusion")
    assert explained.status_code == status


def test_the_service_survives_hostile_uploads(client: TestClient) -> None:
    for data, _ in HOSTILE.values():
        upload(client, data)
    assert client.get("/healthz").json()["status"] == "ok"
    assert upload(client, png_bytes(chest_like())).status_code == 200


def test_malformed_requests(client: TestClient) -> None:
    no_file = client.post("/v1/predict", data={"other": "x"}, files={"nofile": ("", b"", "text/plain")})
    assert no_file.status_code == 400 and "'file' part" in no_file.json()["detail"]
    broken = client.post("/v1/predict", content=b"--xyz\r\nbroken", headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert broken.status_code == 400
    declared = client.post("/v1/predict", content=bytes(LIMIT + 1), headers={"content-type": "application/octet-stream"})
    assert declared.status_code == 413


def test_messages_are_clear(client: TestClient) -> None:
    assert "PNG, JPEG or DICOM" in upload(client, b"plain text").json()["detail"]
    assert "no pixel data" in upload(client, HOSTILE["DICOM without pixel data"][0]).json()["detail"]
    assert "decompression bomb" in upload(client, HOSTILE["PNG decompression bomb 8000 x 8000"][0]).json()["detail"]
    assert "limit" in upload(client, HOSTILE["over the size limit"][0]).json()["detail"]


def test_uploads_never_touch_the_disk(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("an upload was about to be written to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    noise = np.random.default_rng(0).integers(0, 256, (1400, 1400), dtype=np.uint8)
    data = png_bytes(noise)
    assert len(data) > 1.5 * 2**20  # bigger than Starlette's in-memory spool, which would go to disk
    with TestClient(create_app(predictor, max_upload_bytes=4 * 2**20), base_url="http://localhost") as c:
        assert upload(c, data).status_code == 200


def test_dicom_patient_fields_never_leave_the_service(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    img = chest_like(64)
    uploads = [
        dicom_bytes(img.astype(np.uint16) * 257, patient=PATIENT),
        dicom_bytes(img, pixel_data=False, patient=PATIENT),
        dicom_bytes(img, patient=PATIENT)[:-500],  # pixel data cut short
    ]
    bodies = []
    for data in uploads:
        for path, params in (("/v1/predict", {"image": "true"}), ("/v1/explain", {"finding": "Mass"})):
            response = upload(client, data, path=path, name="scan.dcm", **params)
            assert response.status_code in (200, 422)
            bodies.append(response.content.decode("latin-1") + str(response.headers))
    assert [b.startswith("{") for b in bodies[:2]] == [True, False]  # a prediction and a PNG came back
    for secret in ("Doe", "Jane", "PID-7731", "19610203"):
        assert all(secret not in b for b in bodies)
        assert secret not in caplog.text
    assert caplog.records, "the service should log its requests"


def test_scrub_removes_patient_values_from_messages() -> None:
    data = dicom_bytes(chest_like(16), patient=PATIENT)
    message = "bad value 'Doe^Jane' for PID-7731-SECRET, born 19610203 (Jane)"
    cleaned = scrub_patient_values(message, data)
    assert all(s not in cleaned for s in ("Doe", "Jane", "PID-7731", "19610203"))
    assert scrub_patient_values(message, png_bytes(chest_like(16))) == message


def test_full_queue_answers_503_with_retry_after(tmp_path: Path) -> None:
    blocked, release, entered = blocked_predictor(tmp_path / "b.pt")
    app = create_app(blocked, queue_size=1)
    data = png_bytes(chest_like())

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
            first = asyncio.create_task(c.post("/v1/predict", files={"file": ("a.png", data)}))
            try:
                for _ in range(1000):
                    if entered.is_set():
                        break
                    await asyncio.sleep(0.01)
                second = await c.post("/v1/predict", files={"file": ("a.png", data)})
                assert second.status_code == 503
                assert int(second.headers["retry-after"]) >= 1
                assert "busy" in second.json()["detail"]
                health = await c.get("/healthz")  # the event loop is free while inference runs
                assert {k: health.json()["queue"][k] for k in ("admitted", "capacity")} == {"admitted": 1, "capacity": 1}
            finally:
                release.set()
            assert (await first).status_code == 200
            assert (await c.post("/v1/predict", files={"file": ("a.png", data)})).status_code == 200

    asyncio.run(scenario())
    app.state.queue.close()


def test_explain_returns_a_png_overlay(client: TestClient) -> None:
    response = upload(client, png_bytes(chest_like(100)), path="/v1/explain", finding="Effusion", method="groupcam")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(response.content))
    assert overlay.size == (SIZE, SIZE) and overlay.mode == "RGB"
    assert np.asarray(overlay).std() > 0


def test_explain_validates_its_parameters(client: TestClient) -> None:
    data = png_bytes(chest_like())
    unknown = upload(client, data, path="/v1/explain", finding="Broken_Heart")
    assert unknown.status_code == 422 and "Effusion" in unknown.json()["detail"]
    method = upload(client, data, path="/v1/explain", finding="Mass", method="magic")
    assert method.status_code == 422 and "groupcam" in method.json()["detail"]
    assert client.post("/v1/explain", files={"file": ("a.png", data)}).status_code == 422  # finding is required


def test_model_health_and_schema(client: TestClient) -> None:
    model = client.get("/v1/model").json()
    assert model["findings"] == list(FINDINGS) and model["input_size"] == SIZE and model["cache_size"] == SIZE
    assert model["thresholds"] == dict.fromkeys(FINDINGS, 0.3)
    assert model["val_metrics"] == {"auc": {"mean": 0.81, "Hernia": None}, "epoch": 3}
    assert model["explain"]["available"] and "groupcam" in model["explain"]["methods"]
    assert client.get("/healthz").json()["status"] == "ok"
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/explain", "/v1/model", "/healthz"} <= set(schema["paths"])
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"


def test_page_is_self_contained_and_accessible(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "no external assets"
    assert not re.search(r"@import|url\(\s*['\"]?https?:", page)
    for needle in ('id="bars"', 'aria-live="polite"', 'type="file"', "aria-label", "aria-pressed", "v1/explain"):
        assert needle in page


def test_upload_types_are_judged_by_content_and_the_overlay_blends_the_heatmap() -> None:
    from cxrdx.explain.render import OVERLAY_ALPHA, overlay, png_bytes
    from cxrdx.uploads import sniff

    assert sniff(png_bytes(np.zeros((4, 4)))) == "png" and sniff(b"\xff\xd8\xff\xe0rest") == "jpeg"
    assert sniff(b"\0" * 128 + b"DICM" + b"\0" * 8) == "dicom" and sniff(b"GIF89a") is None
    gray = np.full((2, 2), 0.5)
    blended = overlay(gray, np.zeros((2, 2)))  # jet at 0 is dark blue (0, 0, 0.5)
    np.testing.assert_allclose(blended[0, 0], [(1 - OVERLAY_ALPHA) * 0.5, (1 - OVERLAY_ALPHA) * 0.5, 0.5], atol=1e-9)
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(blended))))
    assert decoded.shape == (2, 2, 3) and decoded[0, 0].tolist() == [70, 70, 128]
