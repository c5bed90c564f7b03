"""Bearer-key middleware shared by both apps: checked before the body is read, only on
the protected path prefix (probes and Prometheus stay open)."""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server.errors import AuthenticationError


def require_bearer(app: FastAPI, keys: list[str], prefix: str = "/v1/") -> None:
    if not keys:
        return
    encoded = [k.encode() for k in keys]

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if request.url.path.startswith(prefix):
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.encode(), k) for k in encoded):
                error = AuthenticationError("missing or invalid API key (send 'Authorization: Bearer <key>')")
                return JSONResponse(error.body(), status_code=error.status_code)
        return await call_next(request)
