"""Bearer-key middleware shared by both apps: checked before the body is read, only on
the protected path prefix (probes and Prometheus stay open)."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server.errors import AuthenticationError


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_matches(key: str, digests: list[bytes]) -> bool:
    """Constant time in the key and over the keys: both sides are hashed (so the length of
    a key leaks nothing), and every key's digest is compared, with no early exit."""
    presented = _digest(key)
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(presented, digest)
    return matched


def require_bearer(app: FastAPI, keys: list[str], prefix: str | tuple[str, ...] = "/v1/") -> None:
    if not keys:
        return
    digests = [_digest(k) for k in keys]

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if request.url.path.startswith(prefix):
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            # Hash and compare even when the scheme is wrong: the answer's timing says nothing.
            if not key_matches(key, digests) or scheme.lower() != "bearer":
                error = AuthenticationError("missing or invalid API key (send 'Authorization: Bearer <key>')")
                return JSONResponse(error.body(), status_code=error.status_code)
        return await call_next(request)
