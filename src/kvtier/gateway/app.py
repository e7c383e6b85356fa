"""The HTTP surface: OpenAI's `/v1/chat/completions`, `/v1/completions`, `/v1/models` and
`/v1/responses`, plus `/metrics` and `/healthz`.

FastAPI on uvicorn, as vLLM's own server and most Python gateways: the field's norm, so
operators know how to run and observe it, and the official clients are tested against the
same stack. Handlers take the raw `Request` and parse JSON themselves, with no per-request
pydantic models: the gateway forwards bodies it does not need to understand, and validating
every field would cost time on the hot path and reject fields a newer worker accepts. The POST
routes are plain Starlette routes (FastAPI's dependency solving and exit stacks cost ~15 us a
request for nothing here; /openapi.json does not list them), and a stream is an `EventStream`.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from kvtier.gateway import upstream
from kvtier.gateway.errors import ApiError
from kvtier.gateway.gateway import Gateway, affinity_names
from kvtier.gateway.httpio import SSE_HEADERS, EventStream, read_json, until_disconnected
from kvtier.gateway.priority import PRIORITY_HEADER
from kvtier.gateway.sessions_api import responses_endpoint
from kvtier.gateway.taskqueue import TaskQueue

log = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]


def create_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway.session = upstream.new_session(gateway.settings.worker_api_key)
        gateway.metrics.attach(gateway.pool)
        gateway.pool.start(gateway.session, gateway.settings.scrape_interval_s)
        await gateway.refresh_models()
        # What exists now (modules, the app) lives for good: keep it out of the collector's
        # full passes, which otherwise stall every request in flight for ~60 ms now and then.
        gc.collect()  # what is garbage now is not kept for good
        gc.freeze()
        try:
            yield
        finally:
            await gateway.pool.stop()
            await gateway.session.close()
            await gateway.affinities.close()
            await gateway.responses.close()
            if gateway.tasks is not None:
                await gateway.tasks.close()
            if gateway.gate.limiter is not None:
                await gateway.gate.limiter.close()

    app = FastAPI(title="kvtier gateway", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(ApiError)  # the GET routes: a wrong key is a 401, not a 500
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    handlers: dict[str, Handler] = {
        "/v1/chat/completions": lambda r: completion(gateway, r, "/v1/chat/completions"),
        "/v1/completions": lambda r: completion(gateway, r, "/v1/completions"),
        "/v1/responses": lambda r: responses_endpoint(gateway, r),
        "/v1/queue/chat/completions": lambda r: queue_submit(gateway, r),
    }
    for path, handler in handlers.items():  # plain Starlette routes: nothing to solve per call
        app.add_route(path, _answering(gateway, path, handler), methods=["POST"])
    _add_info_routes(app, gateway)
    return app


async def completion(gateway: Gateway, request: Request, path: str) -> Response:
    """A chat or legacy completion, streamed or not, within its limits and priority."""
    caller = gateway.caller(request.headers.get("authorization"))
    body = await read_json(request, gateway.settings.max_body_bytes)
    await gateway.check_model(body.get("model"))
    affinities = affinity_names(body)
    prompts = await gateway.count(body)
    gate, tenant = gateway.gate, caller.tenant
    entry = await gate.enter(
        tenant, caller.key, body, request.headers.get(PRIORITY_HEADER), prompts
    )
    try:
        if body.get("stream"):
            usage: dict[str, Any] = {}
            events = await gateway.stream(
                tenant, path, body, prompts, affinities, None, usage.update
            )
            headers = {**SSE_HEADERS, **entry.headers}
            return EventStream(events, lambda: gate.leave(entry, usage), headers)
        work = gateway.complete(tenant, path, body, prompts, affinities)
        result = await until_disconnected(request, work)
    except BaseException:
        gate.leave(entry, None)
        raise
    gate.leave(entry, result.get("usage"))
    return JSONResponse(result, headers=entry.headers)


async def queue_submit(gateway: Gateway, request: Request) -> Response:
    """`POST /v1/queue/chat/completions`: the body of a chat completion, queued durably."""
    caller = gateway.caller(request.headers.get("authorization"))
    tasks = _tasks(gateway)
    body = await read_json(request, gateway.settings.max_body_bytes)
    await gateway.check_model(body.get("model"))
    if body.get("stream"):
        raise ApiError(400, "a queued completion cannot be streamed", param="stream")
    await gateway.gate.admit_only(caller.tenant, caller.key, body)
    body["cache_salt"] = gateway.salt(caller.tenant)
    try:
        task_id = await tasks.submit(caller.tenant, body)
    except OSError as exc:
        raise ApiError(503, f"the queue is unavailable: {exc}") from exc
    return JSONResponse({"id": task_id, "object": "queue.task", "status": "queued"})


def _tasks(gateway: Gateway) -> TaskQueue:
    if gateway.tasks is None:
        raise ApiError(404, "the durable queue needs a gateway started with --redis")
    return gateway.tasks


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

    @app.get("/v1/queue/{task_id}")
    async def queue_status(request: Request, task_id: str) -> Response:
        try:
            caller = gateway.caller(request.headers.get("authorization"))
            status = await _tasks(gateway).status(caller.tenant, task_id)
        except ApiError as exc:
            return exc.response()
        except OSError as exc:
            return ApiError(503, f"the queue is unavailable: {exc}").response()
        if status is None:
            return ApiError(404, f"no queued task {task_id!r}", "id", "not_found").response()
        return JSONResponse(status.body())

    @app.get("/healthz")
    async def healthz() -> Response:
        healthy = sum(w.healthy for w in gateway.pool.workers)
        status = 200 if healthy else 503
        return JSONResponse({"workers": len(gateway.pool.workers), "healthy": healthy}, status)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = gateway.metrics.render(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})


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
        gateway.metrics.answered(path, response.status_code)
        return response

    return endpoint
