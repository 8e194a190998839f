"""The ingress's HTTP boundary: OpenAI error JSON, FastAPI exception handlers, and the gate (401/413).

    ErrorResponse value -> error_json() -> status + {"error": {"message", "type", "param", "code"}}
    FastAPI RequestValidationError -> 400 (not 422), unknown route -> 404, uncaught exception -> 500
    Gate (pure ASGI, before routing): API key -> 401, body over the limit -> 413, request counts
    every error answer -> raymoe_request_errors_total{type}

Part of the ingress: only `ingress.py` imports it, so status codes are still decided in one layer.
"""

from __future__ import annotations

import hmac
import math
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from raymoe.config import ServeConfig
from raymoe.observability import metrics
from raymoe.serve.protocol import ErrorResponse, bad_request, internal_error

if TYPE_CHECKING:
    from raymoe.serve.ingress import OpenAiIngress


def record_error(err: ErrorResponse) -> None:
    metrics.inc("raymoe_request_errors_total", type=err.type)


def error_json(err: ErrorResponse) -> JSONResponse:
    record_error(err)
    headers = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(0, math.ceil(err.retry_after_s)))
    if err.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(err.to_dict(), status_code=err.status_code, headers=headers or None)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    if not errors:
        return error_json(bad_request(str(exc)))
    first = errors[0]
    if first.get("type") == "json_invalid":
        return error_json(bad_request(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip()))
    param = _param_path(first, getattr(exc, "body", None))
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more errors)"
    return error_json(bad_request(message, param))


def _param_path(error: dict[str, Any], body: Any) -> str | None:
    """`messages[0].content` from a pydantic location, dropping union-branch labels ('user', 'str').

    A label is any step that is not in the body; only a missing field may be named past the body.
    """
    loc = [p for p in error.get("loc", ()) if p != "body"]
    parts, node = [], body
    for i, step in enumerate(loc):
        if isinstance(node, dict) and step in node:
            parts.append(f".{step}")
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            parts.append(f"[{step}]")
            node = node[step]
        elif i == len(loc) - 1 and error.get("type") == "missing":
            parts.append(f".{step}")
    return "".join(parts).lstrip(".") or None


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    status = getattr(exc, "status_code", 500)
    kinds = {404: "not_found_error", 405: "invalid_request_error"}
    detail = getattr(exc, "detail", "") or ""
    message = {404: "no such route", 405: "method not allowed"}.get(status, str(detail))
    return error_json(ErrorResponse(message, kinds.get(status, "invalid_request_error"), status))


async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    return error_json(internal_error(f"internal error: {type(exc).__name__}"))


def resolve_api_keys(config: ServeConfig, environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    """Keys from the config list plus the comma-separated env var named by `api_keys_env`."""
    extra = environ.get(config.api_keys_env, "") if config.api_keys_env else ""
    return frozenset(k.strip() for k in [*config.api_keys, *extra.split(",")] if k.strip())


class Gate:
    """Pure-ASGI front of the app: API keys (401), body size (413), and request counts by route and status.

    Runs before routing and before FastAPI reads the body, so an oversized or unauthenticated body
    is never parsed. The body is read here (bounded) and replayed to the app.
    """

    def __init__(self, app: Any, *, ingress: OpenAiIngress, routes: frozenset[str]):
        self.app = app
        self.ingress = ingress
        self.routes = routes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cfg = self.ingress.config
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        route = path if path in self.routes else "other"
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.ingress.api_keys and path not in cfg.public_paths and not self._authorized(scope):
                err = ErrorResponse("missing or invalid API key (send 'Authorization: Bearer <key>')",
                                    "authentication_error", 401, None, "invalid_api_key")
                await error_json(err)(scope, receive, send_status)
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive, cfg.limits.max_body_bytes)
                if body is None:
                    err = ErrorResponse(f"request body exceeds {cfg.limits.max_body_bytes} bytes",
                                        "invalid_request_error", 413, None, "request_too_large")
                    await error_json(err)(scope, receive, send_status)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_status)
        finally:
            metrics.inc("raymoe_requests_total", route=route, status=str(status[0]))

    def _authorized(self, scope: dict) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        token_bytes = token.strip().encode()
        return any(hmac.compare_digest(token_bytes, key.encode()) for key in self.ingress.api_keys)

    @staticmethod
    async def _read_body(scope: dict, receive: Callable, limit: int) -> bytes | None:
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the client's disconnect

    return replay


def install_http_boundary(app: FastAPI, ingress: OpenAiIngress) -> None:
    """Add the exception handlers and the gate to `app` (after its routes are defined)."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    routes = frozenset(r.path for r in app.routes if hasattr(r, "path"))
    app.add_middleware(Gate, ingress=ingress, routes=routes)
