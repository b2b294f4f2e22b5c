"""Fetch, verify and safely unpack the 12 ChestX-ray14 image archives (urllib only).

Each archive is downloaded to `NAME.part`, resumed with an HTTP Range request after an
interruption, checked against the size the server announced (and the md5 / size columns when
the links table has them), then unpacked in one streaming pass that also checks the gzip CRC.
Only regular files and folders inside the target folder are accepted; anything else rejects the
whole archive before a single file reaches the target folder.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.client
import os
import re
import shutil
import socket
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from cxrdx.atomic import write_text
from cxrdx.errors import CxrdxError

CHUNK = 1 << 20
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Archive:
    name: str
    url: str
    md5: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Unpacked:
    name: str
    files: int
    skipped: bool  # unpacked by an earlier run


def read_links(path: str | Path | None = None) -> list[Archive]:
    """The links table (columns archive,url and optional md5,size); the packaged NIH table by default."""
    if path is None:
        text = resources.files("cxrdx.data").joinpath("download_links.csv").read_text(encoding="utf-8")
        source = "the packaged download_links.csv"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError):
            raise CxrdxError(f"{path}: no such file") from None
        source = str(path)
    reader = csv.DictReader(text.splitlines())
    if not {"archive", "url"} <= set(reader.fieldnames or ()):
        raise CxrdxError(f"{source}: expected the columns archive,url (and optionally md5,size)")
    archives = []
    for line, row in enumerate(reader, start=2):
        name, url = (row["archive"] or "").strip(), (row["url"] or "").strip()
        if not _SAFE_NAME.match(name):
            raise CxrdxError(f"{source}: line {line}: archive {name!r} must be a plain file name")
        if not url.startswith(("http://", "https://")):
            raise CxrdxError(f"{source}: line {line}: url {url!r} must start with http:// or https://")
        size = (row.get("size") or "").strip()
        if size and not size.isdigit():
            raise CxrdxError(f"{source}: line {line}: size {size!r} must be a number of bytes")
        archives.append(Archive(name, url, (row.get("md5") or "").strip().lower() or None, int(size) if size else None))
    if not archives:
        raise CxrdxError(f"{source}: no archives listed")
    return archives


def parse_archives(spec: str, count: int) -> list[int]:
    """'1-12', '3', '1,4-6' -> sorted 1-based archive numbers, each within 1..count."""
    numbers: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        first, last = (int(match[1]), int(match[2] or match[1])) if match else (0, -1)
        if not match or not 1 <= first <= last <= count:
            raise CxrdxError(f"archives {spec!r}: expected numbers or ranges within 1-{count}, like 1-12 or 1,3,5-7")
        numbers.update(range(first, last + 1))
    return sorted(numbers)


def download(
    to: str | Path,
    archives: list[int] | None = None,
    links: str | Path | None = None,
    keep_archives: bool = False,
    progress: bool = True,
) -> list[Unpacked]:
    """Fetch, verify and unpack the chosen archives (1-based numbers; all by default) into `to`.

    Re-running continues where an interrupted run stopped: finished archives are skipped,
    partial downloads resume. Archives are deleted once unpacked unless `keep_archives`.
    """
    table = read_links(links)
    chosen = [table[n - 1] for n in archives] if archives else table
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    results = []
    for archive in chosen:
        marker = to / f".{archive.name}.done"
        if marker.is_file():
            results.append(Unpacked(archive.name, int(marker.read_text().strip() or 0), skipped=True))
            continue
        path = to / archive.name
        if not path.is_file():
            fetch(archive.url, path, progress=progress)
        try:
            verify(path, archive)
            files = unpack(path, to, progress=progress)
        except CxrdxError as exc:
            path.unlink(missing_ok=True)
            raise CxrdxError(f"{exc} (the archive was deleted; run again to fetch it again)") from None
        write_text(marker, f"{files}\n")
        if not keep_archives:
            path.unlink()
        results.append(Unpacked(archive.name, files, skipped=False))
    return results


def fetch(url: str, dest: str | Path, progress: bool = True, retries: int = 5, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` through `dest.part`, resuming with HTTP Range after interruptions."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    with tqdm(desc=dest.name, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress) as bar:
        failures, problem = 0, "no attempt"
        while failures <= retries:
            before = part.stat().st_size if part.exists() else 0
            try:
                if _fetch_once(url, part, bar, timeout):
                    break
                problem = "the connection closed before the end of the file"
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    raise CxrdxError(f"{url}: HTTP {exc.code} {exc.reason}") from None
                problem = f"HTTP {exc.code} {exc.reason}"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                reason = getattr(exc, "reason", None)
                if isinstance(reason, socket.gaierror):  # offline: retrying cannot help
                    raise CxrdxError(
                        f"{url}: cannot resolve {urllib.parse.urlsplit(url).hostname} ({reason.strerror}); connect "
                        f"this machine to the internet and run the same command again, or run it on a connected machine "
                        f"and copy its --to folder here"
                    ) from None
                problem = str(getattr(exc, "reason", exc))
            after = part.stat().st_size if part.exists() else 0
            if after <= before:  # no progress: count it and back off before the next try
                failures += 1
                if failures <= retries:
                    time.sleep(min(2.0**failures, 30.0))
        else:
            raise CxrdxError(f"{url}: download failed after {retries + 1} attempts without progress ({problem})")
    os.replace(part, dest)
    return dest


def verify(path: str | Path, archive: Archive) -> None:
    """Check the size and md5 the links table gives (when it gives them)."""
    path = Path(path)
    if archive.size is not None and path.stat().st_size != archive.size:
        raise CxrdxError(f"{path}: {path.stat().st_size} bytes, expected {archive.size}")
    if archive.md5 is not None:
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "md5").hexdigest()
        if digest != archive.md5:
            raise CxrdxError(f"{path}: md5 {digest}, expected {archive.md5}")


def unpack(archive: str | Path, to: str | Path, progress: bool = True) -> int:
    """Safely unpack a .tar.gz into `to`; returns the number of files.

    Members go to a staging folder first and move into `to` only when the whole archive
    read cleanly (gzip CRC and length included) and every member was a safe file or folder.
    """
    archive, to = Path(archive), Path(to)
    staging = to / f".{archive.name}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _extract(archive, staging, progress)
        return _merge(staging, to)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch_once(url: str, part: Path, bar: tqdm, timeout: float) -> bool:
    """One request; True when `part` now holds the whole file."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not have:
            raise
        total = _total_from_range(exc.headers.get("Content-Range", ""))
        if total == have:
            return True
        part.unlink()  # longer than the file on the server: start again
        return False
    with response:
        if response.status == 206:
            start, total = _range_start_total(response.headers.get("Content-Range", ""), url)
            if start != have:
                raise CxrdxError(f"{url}: the server resumed at byte {start}, not {have}")
            mode = "ab"
        else:  # the server ignored the Range header: start from the beginning
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        bar.reset(total=total)
        bar.update(have)
        with open(part, mode) as out:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size > total:
        part.unlink()
        return False
    return total is None or size == total


def _range_start_total(header: str, url: str) -> tuple[int, int | None]:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", header.strip())
    if not match:
        raise CxrdxError(f"{url}: unexpected Content-Range {header!r}")
    return int(match[1]), int(match[2]) if match[2] != "*" else None


def _total_from_range(header: str) -> int | None:
    match = re.fullmatch(r"bytes \*/(\d+)", header.strip())
    return int(match[1]) if match else None


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    if not (member.isfile() or member.isdir()):
        kind = "link" if member.issym() or member.islnk() else "special file"
        raise CxrdxError(f"{archive}: refusing {member.name!r}: a {kind}; only regular files and folders are allowed")
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or "\\" in member.name or re.match(r"^[A-Za-z]:", member.name):
        raise CxrdxError(f"{archive}: refusing {member.name!r}: the path leaves the target folder")


def _extract(archive: Path, staging: Path, progress: bool) -> None:
    try:
        with gzip.open(archive, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tqdm(tar, desc=f"unpack {archive.name}", unit="file", disable=not progress):
                _check_member(member, archive)
                tar.extract(member, staging, filter="data")  # the stdlib's own guard as a second line
            while stream.read(CHUNK):  # read to the end so gzip checks its CRC and length trailer
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise CxrdxError(f"{archive}: not a valid .tar.gz archive ({exc})") from None


def _merge(staging: Path, to: Path) -> int:
    """Move the unpacked tree into `to`, replacing files of the same name."""
    files = 0
    for folder, _, names in os.walk(staging):
        target = to / Path(folder).relative_to(staging)
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.replace(Path(folder) / name, target / name)
            files += 1
    return files
