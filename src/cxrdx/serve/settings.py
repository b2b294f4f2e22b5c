"""The service's limits and access policy, checked once so that a bad value is a one-line error."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cxrdx.data.imageio import MAX_DECODED_BYTES
from cxrdx.errors import CxrdxError

MIB = 2**20
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
API_KEY_ENV = "CXRDX_API_KEY"
RATE_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}


@dataclass(frozen=True)
class ServeSettings:
    """Everything `create_app` needs besides the predictor; invalid values raise CxrdxError.

    `allowed_hosts` are the names a request's Host header may carry (any port; "*" allows every
    name). `api_key`, when set, is required as `Authorization: Bearer KEY` on every /v1/ path.
    `rate_per_minute` of None turns the per-client rate limit off.
    """

    max_upload_bytes: int = 32 * MIB
    queue_size: int = 16
    max_inflight_bytes: int = 256 * MIB
    max_decoded_bytes: int = MAX_DECODED_BYTES
    body_timeout_s: float = 60.0
    rate_per_minute: float | None = None
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    api_key: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "queue_size", "max_inflight_bytes", "max_decoded_bytes"):
            if getattr(self, name) < 1:
                raise CxrdxError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_inflight_bytes < self.max_upload_bytes:
            raise CxrdxError(
                f"the in-flight budget (--max-inflight-mb, {self.max_inflight_bytes:,} bytes) must hold at least one "
                f"upload of the largest size (--max-upload-mb, {self.max_upload_bytes:,} bytes)"
            )
        positive("body_timeout_s", self.body_timeout_s)
        if self.rate_per_minute is not None:
            positive("rate_per_minute", self.rate_per_minute)
        if not self.allowed_hosts:
            raise CxrdxError("allowed_hosts is empty: no request could be answered")
        if self.api_key is not None and not self.api_key:
            raise CxrdxError("the API key is empty")

    def to_json(self) -> str:
        """The settings for worker processes, without the API key (each worker reads it itself)."""
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k != "api_key"})

    @classmethod
    def from_json(cls, text: str, api_key: str | None) -> ServeSettings:
        fields = json.loads(text)
        return cls(**{**fields, "allowed_hosts": tuple(fields["allowed_hosts"])}, api_key=api_key)


def positive(name: str, value: float) -> float:
    """`value` if it is a finite number above zero, else a CxrdxError naming the option."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise CxrdxError(f"{name} must be a finite number above 0, got {value}")
    return value


def megabytes(name: str, value: float) -> int:
    """Bytes of a size given in MiB on the command line."""
    return max(1, int(positive(name, value) * MIB))


def parse_rate(text: str) -> float | None:
    """'120/min', '5/s', '1000/h' → requests per minute; 'off' → None."""
    if text.strip().lower() in ("off", "none", "0"):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*", text.lower())
    if not match or match.group(2) not in RATE_UNITS or float(match.group(1)) <= 0:
        raise CxrdxError(f"--rate-limit {text!r}: expected requests per period like 120/min, 5/s or 1000/h, or 'off'")
    return float(match.group(1)) * 60.0 / RATE_UNITS[match.group(2)]


def read_api_key(path: str | Path | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The key from `path` (first line, stripped), else from CXRDX_API_KEY, else None."""
    if path is None:
        key = environ.get(API_KEY_ENV, "").strip()
        return key or None
    try:
        lines = Path(path).read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CxrdxError(f"--api-key-file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    if not lines or not lines[0].strip():
        raise CxrdxError(f"--api-key-file {path}: the file is empty")
    return lines[0].strip()


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """0.0.0.0 or :: (every interface), or an empty host."""
    name = host.strip("[]")
    try:
        return not name or ipaddress.ip_address(name).is_unspecified
    except ValueError:
        return False


def host_name(host: str) -> str:
    """The name part of a Host header or host setting: lower case, port removed, IPv6 in brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    if host.count(":") == 1:
        return host.split(":")[0]
    if host.count(":") > 1:  # a bare IPv6 address, written without brackets in a setting
        return f"[{host}]"
    return host
