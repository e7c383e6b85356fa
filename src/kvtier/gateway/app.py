"""The HTTP surface: OpenAI's `/v1/chat/completions`, `/v1/completions`, `/v1/models` and
`/v1/responses`, plus `/metrics` and `/healthz`.

FastAPI on uvicorn, as vLLM's own server and most Python gateways: the field's norm, so
operators know how to run and observe it, and the official clients are tested against the
same stack. Handlers take the raw `Request` and parse JSON themselves, with no per-request
pydantic models: the gateway forwards bodies it does not need to understand, and validating
every field would cost time on the hot path and reject fields a newer worker accepts.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvtier.gateway import upstream
from kvtier.gateway.errors import ApiError
from kvtier.gateway.gateway import Gateway, affinity_name
from kvtier.gateway.httpio import SSE_HEADERS, read_json, until_disconnected
from kvtier.gateway.sessions_api import responses_endpoint

log = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]


def create_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway.session = upstream.new_session()
        gateway.metrics.attach(gateway.pool)
        gateway.pool.start(gateway.session, gateway.settings.scrape_interval_s)
        await gateway.refresh_models()
        try:
            yield
        finally:
            await gateway.pool.stop()
            await gateway.session.close()
            await gateway.affinities.close()
            await gateway.responses.close()

    app = FastAPI(title="kvtier gateway", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return ApiError(exc.status_code, str(exc.detail)).response()

    handlers: dict[str, Handler] = {
        "/v1/chat/completions": lambda r: completion(gateway, r, "/v1/chat/completions"),
        "/v1/completions": lambda r: completion(gateway, r, "/v1/completions"),
        "/v1/responses": lambda r: responses_endpoint(gateway, r),
    }
    for path, handler in handlers.items():
        app.add_api_route(path, _answering(gateway, path, handler), methods=["POST"])
    _add_info_routes(app, gateway)
    return app


async def completion(gateway: Gateway, request: Request, path: str) -> Response:
    """A chat or legacy completion, streamed or not."""
    tenant = gateway.tenant(request.headers.get("authorization"))
    body = await read_json(request, gateway.settings.max_body_bytes)
    await gateway.check_model(body.get("model"))
    affinity = affinity_name(body)
    if body.get("stream"):
        events = await gateway.stream(tenant, path, body, affinity)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    work = gateway.complete(tenant, path, body, affinity)
    return JSONResponse(await until_disconnected(request, work))


def _add_info_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        gateway.tenant(request.headers.get("authorization"))
        await gateway.known_models()
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "kvtier"}
            for m in sorted(gateway.models)
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/healthz")
    async def healthz() -> Response:
        healthy = sum(w.healthy for w in gateway.pool.workers)
        status = 200 if healthy else 503
        return JSONResponse({"workers": len(gateway.pool.workers), "healthy": healthy}, status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")


def _answering(gateway: Gateway, path: str, handler: Handler) -> Handler:
    """Turns ApiError, and any unexpected failure, into OpenAI's error object and counts
    every answer by status."""

    async def endpoint(request: Request) -> Response:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = exc.response()
        except Exception:
            log.exception("%s failed", path)
            response = ApiError(500, "the gateway failed on this request").response()
        gateway.metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    return endpoint
