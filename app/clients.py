"""Who may call, and how often: API keys, per-client rate limits, and the gate that applies them.

- **Keys** (`FER_API_KEYS_FILE`): one client per line, `name:sha256-hex-of-its-key`; the file
  never holds a key. `fer keys add NAME` makes a key, prints it once and appends its line. The
  file is re-read when it changes (its size, mtime or inode), so a key is added or revoked
  without a restart; a file that turns unreadable or malformed keeps the last good one (and
  says so in the log).
- **The check** hashes what the client sent and compares it with every stored hash in constant
  time, with no early exit: a wrong key costs what a right one does, and how many keys match
  a prefix is not told by the time it takes. A missing and a wrong key get the same 401 body.
- **Rate limits** (`FER_RATE_LIMIT` requests/s per client, `FER_RATE_BURST` at once): a token
  bucket per client (the key's name; without keys, the peer's address). A request costs one
  token when it enters; a batch upload one more per file past the first and a video
  `VIDEO_TOKENS` in all, charged once the route knows (the bucket may go into debt, and the
  next requests wait it out). Over the limit: 429 with `Retry-After`, sent after holding the
  request that long (a second at most), so a client that retries at once cannot spin the
  service with refusals.
- The client's name (never its key) is in the access log line and the Prometheus counters.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import RateLimited, Unauthorized, error_response

logger = logging.getLogger(__name__)

# Routes anyone may call: the probes, and the web page (which then sends the key it is given).
OPEN_PATHS = frozenset({"/health", "/ready", "/"})
# A video's analysis costs about as much as this many photos (docs/video.md: 5 frames/s analysed).
VIDEO_TOKENS = 10
ANONYMOUS = "anonymous"  # the client's name in logs and metrics when no keys file is set
_LINE = re.compile(r"^(?P<name>[A-Za-z0-9_.@-]{1,64}):(?P<digest>[0-9a-f]{64})$")
# How often the keys file is looked at for a change: a stat a second, not one a request.
RELOAD_CHECK_S = 1.0
# The longest a refused request is held before its 429 (see ClientGate).
TARPIT_MAX_S = 1.0
# Buckets kept at most (without keys, one per address): the least recently seen goes first.
MAX_BUCKETS = 100_000


def key_digest(key: str) -> str:
    """What the keys file stores for a key: its SHA-256, in hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(text: str, source: Path) -> dict[str, str]:
    """`name:digest` lines → {digest: name}; blank lines and `#` comments are skipped.

    Raises:
        ValueError: one line naming the file, the line number and what is wrong.
    """
    keys: dict[str, str] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(
                f"{source}:{number}: not 'name:sha256-hex' (a name of letters, digits and ._@-, then 64 hex "
                "digits): the file holds hashes of keys, never keys (fer keys add NAME writes a line)"
            )
        name, digest = match["name"], match["digest"]
        if name in names or digest in keys:
            raise ValueError(f"{source}:{number}: the client {name!r} or its key is listed twice")
        names.add(name)
        keys[digest] = name
    return keys


def add_key(path: Path, name: str) -> str:
    """Make a new random key for `name`, append its hash to the keys file and return the key (shown once)."""
    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", name):
        raise ValueError(f"client name {name!r}: use 1-64 letters, digits and ._@-")
    existing = parse_keys(path.read_text(encoding="utf-8"), path) if path.exists() else {}
    if name in existing.values():
        raise ValueError(f"{path}: a client named {name!r} is there already: remove its line to replace its key")
    key = secrets.token_urlsafe(32)
    with path.open("a", encoding="utf-8") as keys_file:
        if path.stat().st_size and not path.read_text(encoding="utf-8").endswith("\n"):
            keys_file.write("\n")
        keys_file.write(f"{name}:{key_digest(key)}\n")
    os.chmod(path, 0o600)
    return key


class ApiKeys:
    """The keys file, re-read when it changes; `client_of(authorization)` names the caller or None."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._signature = self._stat_signature()
        # Read at start-up: a missing or malformed file stops the service with its one line.
        self._keys = parse_keys(path.read_text(encoding="utf-8"), path)
        self._checked = time.monotonic()

    def client_of(self, authorization: str | None) -> str | None:
        """The client whose key `authorization` ("Bearer <key>") carries; None for none or a wrong one."""
        self._reload_if_changed()
        scheme, _, key = (authorization or "").partition(" ")
        sent = key_digest(key.strip()) if scheme.lower() == "bearer" else key_digest("")
        found = None
        for digest, name in self._keys.items():  # every digest, no early exit: the time tells nothing
            if hmac.compare_digest(digest, sent):
                found = name
        return found if scheme.lower() == "bearer" and key.strip() else None

    @property
    def names(self) -> tuple[str, ...]:
        """The clients the file lists now."""
        return tuple(self._keys.values())

    def _stat_signature(self) -> tuple[int, int, int]:
        status = self.path.stat()
        return status.st_ino, status.st_size, status.st_mtime_ns

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        with self._lock:
            if now - self._checked < RELOAD_CHECK_S:
                return
            self._checked = now
            try:
                signature = self._stat_signature()
                if signature == self._signature:
                    return
                keys = parse_keys(self.path.read_text(encoding="utf-8"), self.path)
            except (OSError, ValueError) as exc:
                logger.warning("keys file not reloaded, the last good one stays: %s", exc)
                return
            self._keys, self._signature = keys, signature
            logger.info("keys file %s reloaded: %d clients", self.path, len(keys))


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per client: `rate` tokens a second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.clock = time.monotonic  # a test may turn it by hand
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def take(self, client: str, tokens: float = 1.0) -> float:
        """Take `tokens` (0 returned), or refuse and return the seconds until they are there."""
        with self._lock:
            bucket = self._refilled(client)
            if bucket.tokens < min(tokens, self.burst):
                return (min(tokens, self.burst) - bucket.tokens) / self.rate
            bucket.tokens -= tokens
            return 0.0

    def charge(self, client: str, tokens: float) -> None:
        """Charge `tokens` more for a request already admitted (a batch's files): the bucket may go into debt."""
        with self._lock:
            self._refilled(client).tokens -= tokens

    def _refilled(self, client: str) -> _Bucket:
        now = self.clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:  # without keys, clients are addresses: forget the stalest
                self._buckets.popitem(last=False)
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
        else:
            self._buckets.move_to_end(client)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        return bucket


UNAUTHORIZED = "a valid API key is required: send the header Authorization: Bearer <key>"


class ClientGate:
    """ASGI middleware: names the client (`scope["state"]["client"]`), refuses it 401 or 429, or lets it in."""

    def __init__(self, app: ASGIApp, *, keys: ApiKeys | None, limiter: RateLimiter | None) -> None:
        self.app, self.keys, self.limiter = app, keys, limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if self.keys is None:
            client, bucket = ANONYMOUS, (scope.get("client") or ("unknown", 0))[0]
        else:
            headers = dict(scope.get("headers") or [])
            name = self.keys.client_of(headers.get(b"authorization", b"").decode("latin-1") or None)
            if name is None:
                state["client"] = "-"
                refusal = error_response(Unauthorized(UNAUTHORIZED), headers={"WWW-Authenticate": "Bearer"})
                await refusal(scope, receive, send)
                return
            client = bucket = name
        state["client"], state["bucket"] = client, bucket
        if self.limiter is not None:
            wait_s = self.limiter.take(bucket)
            if wait_s > 0:
                state["rate_limited"] = True
                retry = str(max(1, math.ceil(wait_s)))
                # Held for its Retry-After (a second at most) before the 429: a client that retries
                # at once on each of its connections would otherwise spin the event loop with
                # refusals (1,160 a second from eight connections doubled the others' p99; held
                # until the next token only, 175 a second, still ×1.5).
                await asyncio.sleep(min(float(retry), TARPIT_MAX_S))
                refusal = error_response(
                    RateLimited(
                        f"{client}: over the rate limit of {self.limiter.rate:g} requests/s "
                        f"(bursts of {self.limiter.burst}): retry after {retry} s"
                    ),
                    headers={"Retry-After": retry},
                )
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def charge_extra(request: Request, tokens: float) -> None:
    """Charge the request's client `tokens` more than the one it paid on entry (a batch's files, a video)."""
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    bucket = request.scope.get("state", {}).get("bucket")
    if limiter is not None and bucket is not None and tokens > 0:
        limiter.charge(bucket, tokens)
