"""Download, resume, verify and safe unpacking, against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import tarfile
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cxrdx.cli import main
from cxrdx.data.download import download, fetch, parse_archives, read_links, unpack
from cxrdx.errors import CxrdxError


def make_targz(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    """A .tar.gz of regular files given as (name, bytes) and of hand-made TarInfo entries (links, ...)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def image_archive(first: int, count: int, seed: int) -> tuple[bytes, dict[str, bytes]]:
    """An archive shaped like NIH's: images/<name>.png entries (random bytes, incompressible)."""
    rng = np.random.default_rng(seed)
    files = {f"images/{i:08d}_000.png": rng.bytes(40_000) for i in range(first, first + count)}
    return make_targz([(name, data) for name, data in files.items()]), files


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.fixture
def server() -> Iterator[SimpleNamespace]:
    """Serves `state.files` with Range support; paths in `state.truncate_once` are cut short once."""
    state = SimpleNamespace(files={}, truncate_once=set(), requests=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            state.requests.append((self.path, self.headers.get("Range")))
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            start = 0
            if self.headers.get("Range"):
                start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"])[1])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path in state.truncate_once:
                state.truncate_once.discard(self.path)
                body = body[: len(body) // 3]  # then the connection closes (HTTP/1.0)
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def links_csv(path: Path, server: SimpleNamespace, archives: dict[str, bytes], md5: dict[str, str] | None = None) -> Path:
    lines = ["archive,url" + (",md5" if md5 is not None else "")]
    for name, data in archives.items():
        server.files[f"/static/{name}"] = data
        lines.append(f"{name},{server.url}/static/{name}" + (f",{md5[name]}" if md5 is not None else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_download_verify_unpack_and_skip_on_rerun(server: SimpleNamespace, tmp_path: Path) -> None:
    first, files_1 = image_archive(1, 3, seed=1)
    second, files_2 = image_archive(4, 2, seed=2)
    links = links_csv(tmp_path / "links.csv", server, {"images_001.tar.gz": first, "images_002.tar.gz": second})
    to = tmp_path / "data"
    results = download(to, links=links, progress=False)
    assert [(r.name, r.files, r.skipped) for r in results] == [("images_001.tar.gz", 3, False), ("images_002.tar.gz", 2, False)]
    assert {name: (to / name).read_bytes() for name in files_1 | files_2} == files_1 | files_2
    assert files_under(to) == set(files_1 | files_2) | {".images_001.tar.gz.done", ".images_002.tar.gz.done"}
    requests = len(server.requests)
    again = download(to, links=links, progress=False)
    assert [(r.files, r.skipped) for r in again] == [(3, True), (2, True)]
    assert len(server.requests) == requests  # nothing fetched twice


def test_resume_after_a_truncated_transfer(server: SimpleNamespace, tmp_path: Path) -> None:
    archive, files = image_archive(1, 4, seed=3)
    links = links_csv(tmp_path / "links.csv", server, {"images_001.tar.gz": archive})
    server.truncate_once.add("/static/images_001.tar.gz")
    download(tmp_path / "data", links=links, progress=False)
    assert server.requests == [("/static/images_001.tar.gz", None), ("/static/images_001.tar.gz", f"bytes={len(archive) // 3}-")]
    assert {name: (tmp_path / "data" / name).read_bytes() for name in files} == files


def test_resume_from_a_part_file_of_an_earlier_run(server: SimpleNamespace, tmp_path: Path) -> None:
    data = np.random.default_rng(4).bytes(300_000)
    server.files["/blob"] = data
    (tmp_path / "blob.part").write_bytes(data[:123_456])
    fetch(f"{server.url}/blob", tmp_path / "blob", progress=False)
    assert server.requests == [("/blob", "bytes=123456-")]
    assert (tmp_path / "blob").read_bytes() == data
    assert not (tmp_path / "blob.part").exists()
    # a part file that already holds everything: the server answers 416 and nothing is lost
    (tmp_path / "blob2.part").write_bytes(data)
    fetch(f"{server.url}/blob", tmp_path / "blob2", progress=False)
    assert server.requests[-1] == ("/blob", "bytes=300000-")
    assert (tmp_path / "blob2").read_bytes() == data


def test_missing_url_is_a_clear_error(server: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(CxrdxError, match=r"/absent.tar.gz: HTTP 404"):
        fetch(f"{server.url}/absent.tar.gz", tmp_path / "x.tar.gz", progress=False)


@pytest.mark.parametrize(
    "bad",
    [
        ("../evil.txt", b"x"),
        ("/tmp/cxrdx-absolute-evil.txt", b"x"),
        ("images/../../evil.txt", b"x"),
        link("images/escape", "../../evil.txt"),
        link("images/passwd", "/etc/passwd"),
        link("images/hard", "/etc/passwd", tarfile.LNKTYPE),
        link("images/inside", "00000001_000.png"),
    ],
    ids=["dotdot", "absolute", "nested-dotdot", "symlink-out", "symlink-absolute", "hardlink", "symlink-in"],
)
def test_unsafe_archives_are_rejected_whole(tmp_path: Path, bad: tarfile.TarInfo | tuple[str, bytes]) -> None:
    archive = tmp_path / "images_001.tar.gz"
    archive.write_bytes(make_targz([("images/00000001_000.png", b"fine"), bad, ("images/00000002_000.png", b"fine")]))
    to = tmp_path / "data" / "inner"
    to.mkdir(parents=True)
    with pytest.raises(CxrdxError, match="refusing"):
        unpack(archive, to, progress=False)
    assert list(to.iterdir()) == []  # not even the safe first member, no staging folder left
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "evil.txt").exists()
    assert not Path("/tmp/cxrdx-absolute-evil.txt").exists()


def test_malicious_download_is_rejected_and_deleted(server: SimpleNamespace, tmp_path: Path) -> None:
    evil = make_targz([("images/00000001_000.png", b"fine"), ("../evil.txt", b"x")])
    links = links_csv(tmp_path / "links.csv", server, {"images_001.tar.gz": evil})
    to = tmp_path / "data"
    with pytest.raises(CxrdxError, match=r"refusing '../evil.txt'.*archive was deleted"):
        download(to, links=links, progress=False)
    assert files_under(to) == set()
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("damage", ["flipped-byte", "cut-trailer"])
def test_corrupt_archives_are_rejected(tmp_path: Path, damage: str) -> None:
    archive, _ = image_archive(1, 3, seed=5)
    if damage == "flipped-byte":
        position = len(archive) // 2
        archive = archive[:position] + bytes([archive[position] ^ 0xFF]) + archive[position + 1 :]
    else:
        archive = archive[:-4]  # the gzip length field: every tar member is still complete
    (tmp_path / "a.tar.gz").write_bytes(archive)
    (tmp_path / "out").mkdir()
    with pytest.raises(CxrdxError, match="a.tar.gz: not a valid .tar.gz archive"):
        unpack(tmp_path / "a.tar.gz", tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_md5_from_the_links_table_is_checked(server: SimpleNamespace, tmp_path: Path) -> None:
    archive, files = image_archive(1, 2, seed=6)
    good = hashlib.md5(archive).hexdigest()
    links = links_csv(tmp_path / "links.csv", server, {"images_001.tar.gz": archive}, md5={"images_001.tar.gz": good})
    assert download(tmp_path / "ok", links=links, progress=False)[0].files == 2
    links = links_csv(tmp_path / "links.csv", server, {"images_001.tar.gz": archive}, md5={"images_001.tar.gz": "0" * 32})
    with pytest.raises(CxrdxError, match=f"md5 {good}, expected 0000"):
        download(tmp_path / "bad", links=links, progress=False)
    assert not (tmp_path / "bad" / "images_001.tar.gz").exists()


def test_packaged_links_table() -> None:
    archives = read_links()
    assert [a.name for a in archives] == [f"images_{i:03d}.tar.gz" for i in range(1, 13)]
    assert all(a.url.startswith("https://nihcc.box.com/") and a.md5 is None for a in archives)


def test_packaged_links_table_is_the_public_one(shared_data: Path) -> None:
    packaged = resources.files("cxrdx.data").joinpath("download_links.csv").read_text()
    assert packaged == (shared_data / "chestxray14" / "download_links.csv").read_text()


def test_links_table_errors(tmp_path: Path) -> None:
    (tmp_path / "links.csv").write_text("archive,url\n../images_001.tar.gz,https://example.org/a\n")
    with pytest.raises(CxrdxError, match="line 2: archive '../images_001.tar.gz' must be a plain file name"):
        read_links(tmp_path / "links.csv")
    (tmp_path / "links.csv").write_text("archive,url\nimages_001.tar.gz,ftp://example.org/a\n")
    with pytest.raises(CxrdxError, match="must start with http"):
        read_links(tmp_path / "links.csv")


def test_parse_archives() -> None:
    assert parse_archives("1-12", 12) == list(range(1, 13))
    assert parse_archives("3", 12) == [3]
    assert parse_archives("1,4-6, 5", 12) == [1, 4, 5, 6]
    for spec in ["0", "13", "5-2", "a", "1-", ""]:
        with pytest.raises(CxrdxError, match="within 1-12"):
            parse_archives(spec, 12)


def test_cli_download(server: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, _ = image_archive(1, 2, seed=7)
    second, files = image_archive(3, 3, seed=8)
    links = links_csv(tmp_path / "links.csv", server, {"images_001.tar.gz": first, "images_002.tar.gz": second})
    to = tmp_path / "data"
    assert main(["download", "--to", str(to), "--links", str(links), "--archives", "2", "--keep-archives"]) == 0
    assert "images_002.tar.gz: 3 files" in capsys.readouterr().out
    assert [path for path, _ in server.requests] == ["/static/images_002.tar.gz"]
    assert (to / "images_002.tar.gz").read_bytes() == second
    assert set(files) <= files_under(to)
    assert main(["download", "--to", str(to), "--links", str(links), "--archives", "7"]) == 2
    assert "within 1-2" in capsys.readouterr().err
