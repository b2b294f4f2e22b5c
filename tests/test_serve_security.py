"""The service when exposed: API key, Host check, rate limit, option errors, and memory bounded in total."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import blocked_predictor, chest_like, dicom_bytes, make_checkpoint, png_bytes, png_chunk
from PIL import Image, ImageFile

from cxrdx.cli import main
from cxrdx.data.imageio import read_image
from cxrdx.errors import ImageReadError
from cxrdx.predict import Predictor
from cxrdx.serve import create_app
from cxrdx.serve.guard import RateLimiter
from cxrdx.serve.settings import ServeSettings, host_name, parse_rate

KEY = "s3cret-key-for-tests"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("security") / "best.pt")


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, device="cpu")


def post_png(client: TestClient, headers: dict[str, str] | None = None, path: str = "/v1/predict") -> httpx.Response:
    return client.post(path, files={"file": ("x.png", png_bytes(chest_like(64)))}, headers=headers or {})


def png16_rgba(side: int) -> bytes:
    """A valid 16-bit RGBA PNG of side x side zeros: small on the wire, 4 bytes a pixel once decoded by Pillow."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + side * 8)  # filter byte + 4 samples of 2 bytes
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


# --- API key -------------------------------------------------------------------------------------


def test_api_key_is_required_on_the_api_and_compared_exactly(predictor: Predictor) -> None:
    with TestClient(create_app(predictor, api_key=KEY), base_url="http://localhost") as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
            for response in (c.get("/v1/model", headers=headers), post_png(c, headers)):
                assert response.status_code == 401, headers
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert "Authorization: Bearer" in response.json()["detail"]
        good = {"Authorization": f"Bearer {KEY}"}
        assert c.get("/v1/model", headers=good).status_code == 200
        assert post_png(c, good).status_code == 200
        assert (
            c.post(
                "/v1/explain", params={"finding": "Mass"}, files={"file": ("x.png", png_bytes(chest_like(64)))}, headers=good
            ).status_code
            == 200
        )
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # no data behind these


def test_without_a_key_the_api_is_open(predictor: Predictor) -> None:
    with TestClient(create_app(predictor), base_url="http://localhost") as c:
        assert c.get("/v1/model").status_code == 200


# --- Host header ---------------------------------------------------------------------------------


def test_foreign_host_names_are_refused(predictor: Predictor) -> None:
    app = create_app(predictor, allowed_hosts=("localhost", "127.0.0.1", "[::1]", "xray.example.org"))
    with TestClient(app, base_url="http://localhost") as c:
        for host in ("attacker.example", "localhost.attacker.example", "127.0.0.2", "", "xray.example.org.evil"):
            response = c.get("/healthz", headers={"Host": host})
            assert response.status_code == 400, host
            assert "--allowed-host" in response.json()["detail"]
        for host in (
            "localhost",
            "localhost:8000",
            "LOCALHOST:1",
            "127.0.0.1",
            "127.0.0.1:8000",
            "[::1]",
            "[::1]:8000",
            "xray.example.org:443",
        ):
            assert c.get("/healthz", headers={"Host": host}).status_code == 200, host
    with TestClient(create_app(predictor, allowed_hosts=("*",)), base_url="http://anything.example") as c:
        assert c.get("/healthz").status_code == 200


def test_host_names_are_normalised() -> None:
    assert [host_name(h) for h in ("LocalHost:80", "[::1]:8000", "::1", "10.0.0.5", "x.org:")] == [
        "localhost",
        "[::1]",
        "[::1]",
        "10.0.0.5",
        "x.org",
    ]


# --- rate limit ----------------------------------------------------------------------------------


def test_rate_limit_answers_429_with_retry_after(predictor: Predictor) -> None:
    with TestClient(create_app(predictor, rate_per_minute=3), base_url="http://localhost") as c:
        assert [c.get("/v1/model").status_code for _ in range(3)] == [200, 200, 200]
        limited = post_png(c)
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 20  # one token comes back every 20 s
        assert "too many requests" in limited.json()["detail"]
        assert c.get("/healthz").status_code == 200  # liveness checks are not limited


def test_token_buckets_refill_per_client_and_stay_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0], max_clients=3)  # one a second, bursts of 60
    assert all(limiter.acquire("a") == 0 for _ in range(60))
    assert limiter.acquire("a") == pytest.approx(1.0)
    assert limiter.acquire("b") == 0  # another address has its own bucket
    now[0] += 2.5
    assert limiter.acquire("a") == 0 and limiter.acquire("a") == 0 and limiter.acquire("a") > 0
    for client in "cdefg":
        limiter.acquire(client)
    assert len(limiter.buckets) == 3 and "a" not in limiter.buckets


def test_rate_limit_parsing() -> None:
    assert parse_rate("120/min") == 120 and parse_rate("5/s") == 300 and parse_rate("600/h") == 10
    assert parse_rate("off") is None
    for bad in ("120", "x/min", "5/fortnight", "-3/min", "0/s"):
        with pytest.raises(Exception, match="--rate-limit"):
            parse_rate(bad)


# --- command line --------------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import cxrdx.cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cxrdx.cli, "_load_predictor", refuse)
    monkeypatch.delenv("CXRDX_API_KEY", raising=False)


BAD_OPTIONS = {
    "--queue-size 0": "--queue-size must be at least 1",
    "--port 70000": "--port must be between 1 and 65535",
    "--port 0": "--port must be between 1 and 65535",
    "--workers 0": "--workers must be at least 1",
    "--max-upload-mb nan": "--max-upload-mb must be a finite number above 0",
    "--max-upload-mb -1": "--max-upload-mb must be a finite number above 0",
    "--max-inflight-mb inf": "--max-inflight-mb must be a finite number above 0",
    "--max-inflight-mb 4": "must hold at least one upload",
    "--max-decoded-mb 0": "--max-decoded-mb must be a finite number above 0",
    "--rate-limit 5/fortnight": "--rate-limit '5/fortnight'",
    "--body-timeout 0": "--body-timeout must be a finite number above 0",
    "--idle-timeout nan": "--idle-timeout must be a finite number above 0",
    "--api-key-file /nonexistent/key": "--api-key-file /nonexistent/key: cannot read it",
    "--host 0.0.0.0": "--host 0.0.0.0 makes the service reachable from other machines",
    "--host 192.0.2.7": "give it an API key",
}


@pytest.mark.parametrize("options", list(BAD_OPTIONS))
def test_bad_options_are_one_line_errors_before_the_model_loads(
    options: str, no_model_load: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--checkpoint", "best.pt", *options.split()]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cxrdx serve: error: ") and BAD_OPTIONS[options] in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_empty_or_missing_key_file(tmp_path: Path, no_model_load: None, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "key"
    empty.write_text("\n  \n")
    assert main(["serve", "--checkpoint", "best.pt", "--api-key-file", str(empty)]) == 2
    assert "the file is empty" in capsys.readouterr().err


def test_public_address_with_insecure_or_a_key_starts_with_a_warning(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    monkeypatch.delenv("CXRDX_API_KEY", raising=False)
    runs = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: runs.append((app, kwargs)))
    assert main(["serve", "--checkpoint", str(checkpoint), "--host", "0.0.0.0", "--insecure", "--idle-timeout", "3"]) == 0
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0" in err and "without an API key" in err and "--allowed-host" in err
    app, kwargs = runs[-1]
    assert kwargs["host"] == "0.0.0.0" and kwargs["timeout_keep_alive"] == 3
    assert app.state.settings.api_key is None and app.state.settings.rate_per_minute == 120

    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    argv = [
        "serve",
        "--checkpoint",
        str(checkpoint),
        "--host",
        "192.0.2.7",
        "--api-key-file",
        str(key_file),
        "--allowed-host",
        "xray.example.org",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: listening on 192.0.2.7" in err and "without an API key" not in err
    settings = runs[-1][0].state.settings
    assert settings.api_key == KEY and {"192.0.2.7", "xray.example.org", "localhost"} <= set(settings.allowed_hosts)
    assert KEY not in repr(settings) and KEY not in settings.to_json()

    monkeypatch.setenv("CXRDX_API_KEY", KEY)
    assert main(["serve", "--checkpoint", str(checkpoint)]) == 0  # loopback: no warning
    assert runs[-1][0].state.settings.api_key == KEY and "warning" not in capsys.readouterr().err


# --- memory --------------------------------------------------------------------------------------


def test_admission_comes_before_the_body_is_read(tmp_path: Path) -> None:
    """A request over the in-flight budget gets 503 without one byte of its body being read."""
    blocked, release, entered = blocked_predictor(tmp_path / "b.pt")
    app = create_app(blocked, max_upload_bytes=2**20, max_inflight_bytes=3 * 2**19, queue_size=8)  # room for 1.5 MiB
    read = []

    async def second_body():
        read.append(True)
        yield bytes(2**20)

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
            first = asyncio.create_task(c.post("/v1/predict", content=png_bytes(chest_like(64)) + bytes(2**19)))
            try:
                for _ in range(1000):
                    if entered.is_set():
                        break
                    await asyncio.sleep(0.01)
                assert app.state.queue.state()["bytes_in_flight"] > 2**19
                second = await c.post("/v1/predict", content=second_body(), headers={"content-length": str(2**20)})
                assert second.status_code == 503 and int(second.headers["retry-after"]) >= 1
                assert "bytes of uploads are already in memory" in second.json()["detail"]
                assert not read, "the body of a refused request was read"
                small = asyncio.create_task(c.post("/v1/predict", content=png_bytes(chest_like(32))))  # fits beside the first
                for _ in range(1000):
                    if app.state.queue.state()["admitted"] == 2:
                        break
                    await asyncio.sleep(0.01)
                assert app.state.queue.state()["admitted"] == 2
            finally:
                release.set()
            assert (await first).status_code == 200 and (await small).status_code == 200
        assert app.state.queue.state()["bytes_in_flight"] == 0 and app.state.queue.state()["admitted"] == 0

    asyncio.run(scenario())
    app.state.queue.close()


def test_a_stalled_upload_times_out_with_408(predictor: Predictor) -> None:
    app = create_app(predictor, body_timeout_s=0.2)

    async def stalled():
        yield b"\x89PNG\r\n\x1a\n"
        await asyncio.sleep(30)
        yield b"never"

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
            return await c.post("/v1/predict", content=stalled(), headers={"content-length": "1000"})

    response = asyncio.run(scenario())
    assert response.status_code == 408 and "did not arrive within 0.2 s" in response.json()["detail"]
    assert app.state.queue.state()["bytes_in_flight"] == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


UPLOADS, BUDGET_MIB, MARGIN_MIB = 24, 48, 48


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc (Linux)")
def test_memory_stays_bounded_under_many_large_concurrent_uploads(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """24 concurrent uploads of 8-16 MiB (288 MiB in all) against a 48 MiB in-flight budget: the
    server's peak resident memory grows by less than the budget plus a 48 MiB margin."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("CXRDX_API_KEY", None)
    command = [
        sys.executable,
        "-m",
        "cxrdx",
        "serve",
        "--checkpoint",
        str(checkpoint),
        "--port",
        str(port),
        "--max-upload-mb",
        "16",
        "--max-inflight-mb",
        str(BUDGET_MIB),
        "--queue-size",
        str(UPLOADS),
        "--rate-limit",
        "off",
    ]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            assert server.poll() is None, server.stderr.read().decode()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=120) as c:  # warm up the decode path once
            assert c.post("/v1/predict", content=png_bytes(chest_like(64))).status_code == 200
            assert c.post("/v1/predict", content=b"\x89PNG\r\n\x1a\n" + os.urandom(2**20)).status_code == 422
        baseline = status_kib(server.pid, "VmRSS")
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # the peak (VmHWM) restarts from now
        payload = b"\x89PNG\r\n\x1a\n" + os.urandom(16 * 2**20 - 8)  # a PNG signature, then noise: 422 once decoded
        sizes = [random.Random(i).randint(8 * 2**20, 16 * 2**20) for i in range(UPLOADS)]
        statuses: list[int | str] = []

        def send(size: int) -> None:
            view = memoryview(payload)[:size]
            chunks = (bytes(view[i : i + 2**20]) for i in range(0, size, 2**20))
            try:
                with httpx.Client(base_url=url, timeout=120) as c:
                    statuses.append(c.post("/v1/predict", content=chunks, headers={"content-length": str(size)}).status_code)
            except httpx.TransportError as exc:  # a refused request may be closed while it still sends
                statuses.append(type(exc).__name__)

        threads = [threading.Thread(target=send, args=(size,)) for size in sizes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        peak = status_kib(server.pid, "VmHWM")
        with httpx.Client(base_url=url, timeout=30) as c:
            queue = c.get("/healthz").json()["queue"]
    finally:
        server.terminate()
        server.wait(30)
    growth_mib = (peak - baseline) / 1024
    with capsys.disabled():
        print(
            f"\nserver RSS: baseline {baseline / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB (+{growth_mib:.0f} MiB) with "
            f"{UPLOADS} concurrent uploads of 8-16 MiB ({sum(sizes) / 2**20:.0f} MiB), budget {BUDGET_MIB} MiB; "
            f"answers: {sorted(statuses, key=str)}"
        )
    assert len(statuses) == UPLOADS and set(statuses) <= {422, 503, "WriteError", "RemoteProtocolError", "ReadError"}
    assert 422 in statuses  # some were admitted and decoded, the rest refused
    assert queue["admitted"] == 0 and queue["bytes_in_flight"] == 0
    assert growth_mib < BUDGET_MIB + MARGIN_MIB


# --- decoded size --------------------------------------------------------------------------------


def test_decoded_size_guard_refuses_before_decoding(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    data = png16_rgba(1000)  # 1000 x 1000 RGBA: 4,000,000 bytes decoded; a few kB on the wire
    assert len(data) < 50_000
    with TestClient(create_app(predictor, max_decoded_bytes=2**20), base_url="http://localhost") as c:
        assert c.get("/v1/model").json()["max_decoded_bytes"] == 2**20
        monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
        response = c.post("/v1/predict", files={"file": ("big.png", data)})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "1000 x 1000 RGBA pixels decodes to 4,000,000 bytes, over the limit of 1,048,576" in detail


def test_decoded_size_guard_in_the_library() -> None:
    assert read_image(png16_rgba(64), max_decoded_bytes=64 * 64 * 4).shape == (64, 64)
    with pytest.raises(ImageReadError, match="decodes to 16,384 bytes"):
        read_image(png16_rgba(64), max_decoded_bytes=64 * 64 * 4 - 1)
    gray16 = dicom_bytes(chest_like(64).astype(np.uint16) * 257)
    with pytest.raises(ImageReadError, match=r"1 x 64 x 64 x 1 samples of 16 bits decodes to 8,192 bytes"):
        read_image(gray16, max_decoded_bytes=8191)
    assert read_image(gray16, max_decoded_bytes=8192).shape == (64, 64)
    with pytest.raises(ImageReadError, match="decoded-size guard"):
        read_image(Image.new("I;16", (100, 100)), max_decoded_bytes=19_999)


# --- no header values in the log -----------------------------------------------------------------


def test_invalid_patient_values_never_reach_the_log_or_stderr(
    predictor: Predictor, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    data = dicom_bytes(chest_like(64), patient=("Doe^Jane", "PID-7731-SECRET")).replace(b"19610203", b"SECRET01")
    with warnings.catch_warnings(record=True) as seen, TestClient(create_app(predictor), base_url="http://localhost") as c:
        warnings.simplefilter("always")
        answers = [c.post("/v1/predict", files={"file": ("x.dcm", d)}) for d in (data, data[:-500], data[:-4000])]
    assert [a.status_code for a in answers] == [200, 422, 422]
    out, err = capfd.readouterr()
    everything = caplog.text + out + err + "".join(str(w.message) for w in seen) + "".join(a.text for a in answers)
    for secret in ("SECRET01", "Doe", "Jane", "PID-7731"):
        assert secret not in everything


def test_worker_processes_get_the_same_settings_and_read_the_key_themselves(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxrdx.serve import app_from_env

    settings = ServeSettings(queue_size=3, rate_per_minute=30, allowed_hosts=("localhost", "xray.example.org"), api_key=KEY)
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    monkeypatch.setenv("CXRDX_SERVE_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("CXRDX_SERVE_DEVICE", "cpu")
    monkeypatch.setenv("CXRDX_SERVE_SETTINGS", settings.to_json())
    monkeypatch.setenv("CXRDX_SERVE_API_KEY_FILE", str(key_file))
    app = app_from_env()
    assert app.state.settings == settings
    app.state.queue.close()
