"""Who may talk to the service: the Host header, a per-client rate limit and the API key.

One ASGI middleware, run before routing and before any byte of a body is read, in this order:
1. Host check (every path): a name not in the allowed list gets 400. A page on another site that
   re-points its own name at 127.0.0.1 (DNS rebinding) sends its own name, so it is refused.
2. Rate limit (/v1/ paths): a token bucket per client address; an empty bucket gets 429 with
   Retry-After. It runs before the key check, so it also slows down guessing keys.
3. API key (/v1/ paths, when one is configured): `Authorization: Bearer KEY`, compared in
   constant time; anything else gets 401 with `WWW-Authenticate: Bearer`. The page (/), /healthz
   and the API description (/docs, /openapi.json) stay open: they hold no data.
"""

from __future__ import annotations

import hmac
import json
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from cxrdx.serve.settings import ServeSettings, host_name

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED_PREFIX = "/v1/"
MAX_CLIENTS = 10_000  # rate-limit buckets kept; the least recently seen client is forgotten first


class RateLimiter:
    """Token buckets per client: `per_minute` requests a minute, bursts of up to `per_minute`."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic, max_clients: int = MAX_CLIENTS):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute)
        self.clock = clock
        self.max_clients = max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client → (tokens, time)

    def acquire(self, client: str) -> float:
        """0 when the request may go ahead (a token is taken), else the seconds until one is free."""
        now = self.clock()
        tokens, then = self.buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.rate)
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
        self.buckets[client] = (tokens - 1.0 if wait == 0.0 else tokens, now)
        while len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        return wait


class AccessGuard:
    """ASGI middleware enforcing `settings.allowed_hosts`, the rate limit and the API key."""

    def __init__(self, app: ASGIApp, settings: ServeSettings, clock: Callable[[], float] = time.monotonic):
        self.app = app
        self.any_host = "*" in settings.allowed_hosts
        self.hosts = {host_name(h) for h in settings.allowed_hosts}
        self.key = settings.api_key.encode() if settings.api_key else None
        self.limiter = RateLimiter(settings.rate_per_minute, clock) if settings.rate_per_minute else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.any_host and host_name(host) not in self.hosts:
            shown = host[:80] if host.isprintable() else "(unprintable)"
            await _refuse(send, 400, f"Host {shown or '(missing)'} is not served here; start the service with --allowed-host NAME")
            return
        if scope["path"].startswith(PROTECTED_PREFIX):
            if self.limiter is not None:
                client = scope.get("client")
                wait = self.limiter.acquire(client[0] if client else "unknown")
                if wait > 0:
                    retry = str(max(1, math.ceil(wait)))
                    await _refuse(send, 429, f"too many requests from this address; retry in {retry} s", {"retry-after": retry})
                    return
            if self.key is not None and not self._authorized(headers.get(b"authorization", b"")):
                challenge = 'Bearer realm="cxrdx"' + (', error="invalid_token"' if headers.get(b"authorization") else "")
                await _refuse(
                    send, 401, "an API key is required: send the header 'Authorization: Bearer KEY'", {"www-authenticate": challenge}
                )
                return
        await self.app(scope, receive, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.strip().partition(b" ")
        # compare_digest takes the same time wherever the first difference is: no key leaks by timing
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key or b"")


async def _refuse(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A JSON error like FastAPI's own; the body of the request is never read."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
