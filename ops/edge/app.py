"""The edge's HTTP API (Starlette, served by uvicorn: ``ops.edge.run``). JSON in and out;
every refusal is ``{"error": {"code", "message"}}`` with the protocol's error code and an
HTTP status (``ops.edge.checks.http_status``).

    GET  /healthz                       {"ok": true}
    GET  /v1/gateway                    {"public_key", "listing"}: the gateway's key and signed node listing
    POST /v1/search?job_id=ID  SearchQuery  {"job_id", "reply"}: the gateway's signed reply to job ID (the
                                        client's fresh id, which the reply is signed for; else the edge picks one)
    POST /v1/jobs       {"task", "envelope"}   202 {"job_id", "queue"}
    GET  /v1/jobs/{id}?wait=SECONDS     {"state", "reply", "cancel_mark"}: SUCCESS / PENDING_APPROVAL with the
                                        signed reply, else PENDING / STARTED (…) and null; what the job's
                                        cancel key holds (protocol.cancel), or null
    POST /v1/jobs/{id}/cancel  {"cancellation"}  {"job_id", "cancelled": true}: the sender's signed
                                        cancellation is under the job's key before its node took it up;
                                        else {"job_id", "cancelled": false, "mark"}: what got there first
    POST /v1/blobs      raw bytes       {"key"}: left by claim-check, for an hour
    GET  /v1/blobs/{key}                the bytes, taken once
    GET  /v1/models                     {"models": {"owner/name": card}}
    GET  /…                             static files (--static), if the folder exists
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from kombu.exceptions import KombuError
from redis import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ops.edge.broker import EdgeBroker
from ops.edge.checks import (
    CANCEL_BODY_MAX,
    Keyring,
    RateLimiter,
    TooLarge,
    TooMany,
    check_blob_key,
    check_job_id,
    check_length,
    check_task,
    error_body,
    http_status,
    parse_cancel,
    parse_job_request,
    parse_search,
    queue_for,
    verify,
    verify_cancellation,
    wait_seconds,
)
from ops.edge.settings import EdgeSettings
from protocol.contract import node_queue
from protocol.errors import BrokerUnavailable, GridError, InvalidRequest, NotFound, PermissionDenied
from protocol.pinning import shown

log = logging.getLogger(__name__)


class Edge:
    """The routes, over one broker connection, one keyring and the rate limits."""

    def __init__(self, settings: EdgeSettings, keyring: Keyring, broker: EdgeBroker) -> None:
        self.settings, self.keyring, self.broker = settings, keyring, broker
        self.jobs = RateLimiter(settings.job_rate, settings.job_burst, "sender")
        self.ips = RateLimiter(settings.ip_rate, settings.ip_burst, "client")
        self.blobs = RateLimiter(settings.blob_rate, max(settings.blob_burst, settings.blob_body_max), "blob bytes of")

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.broker.start()
        log.info("edge on %s: %d users admitted from %s", shown(self.broker.url), len(self.keyring),
                 self.keyring.folder)
        try:
            yield
        finally:
            await self.broker.close()

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def gateway(self, request: Request) -> Response:
        self.ips.check(_ip(request))
        return JSONResponse(await self.broker.gateway())

    async def search(self, request: Request) -> Response:
        self.ips.check(_ip(request))
        asked = request.query_params.get("job_id")  # the client's: the gateway signs its reply for this id
        job_id = None if asked is None else check_job_id(asked)
        query = parse_search(await read_body(request, self.settings.search_body_max))
        job_id, reply = await self.broker.search(query.model_dump(mode="json"), self.settings.search_timeout, job_id)
        return JSONResponse({"job_id": job_id, "reply": reply})

    async def submit(self, request: Request) -> Response:
        """Verify a signed envelope and enqueue it, as the Python client would have."""
        now = time.time()
        try:  # what fails before its sender is known counts against the client's address
            task, raw = parse_job_request(await read_body(request, self.settings.job_body_max))
            check_task(task)
            env = verify(raw, self.keyring, now)
            check_job_id(env.job_id)
        except GridError:
            self.ips.check(_ip(request))
            raise
        self.jobs.check(env.sender)
        queue = queue_for(task, env.recipient)
        await self.broker.admit(env, queue, now)
        await self.broker.send(task, queue, env.model_dump(mode="json"), env.job_id)  # as verified
        return JSONResponse({"job_id": env.job_id, "queue": queue}, status_code=202)

    async def job(self, request: Request) -> Response:
        self.ips.check(_ip(request))
        job_id = check_job_id(request.path_params["job_id"])
        state, reply, mark = await self.broker.job(job_id, wait_seconds(request.query_params.get("wait"),
                                                                        self.settings.max_wait))
        return JSONResponse({"state": state, "reply": reply, "cancel_mark": mark})

    async def cancel(self, request: Request) -> Response:
        """Put the job's sender's signed cancellation under its cancel key, as the Python
        client's ``ticket.cancel()`` does (``protocol.cancel``): the node then never runs it.
        Only the job's own sender, as the edge recorded it when it relayed the job."""
        try:  # what fails before its signer is known counts against the client's address
            job_id = check_job_id(request.path_params["job_id"])
            mark = parse_cancel(await read_body(request, CANCEL_BODY_MAX))
            name = verify_cancellation(mark, self.keyring, job_id)
        except GridError:
            self.ips.check(_ip(request))
            raise
        self.jobs.check(name)
        sender, queue = await self.broker.sent_by(job_id)  # NotFound for a job never sent
        if sender != name:  # whose it is, the edge does not say
            why = "another user's" if sender else "not one the edge relayed: cancel it from the client that sent it"
            raise PermissionDenied(f"job {job_id} is {why}; only the user who sent a job through the edge may "
                                   "cancel it there", job_id=job_id)
        if queue != node_queue(job_id.split(":", 1)[0]):  # what a node checks its cancel key for (workers.jobs.runner)
            raise InvalidRequest(f"job {job_id} went to {queue}: only a node's job (gridq.node.run_job, its id "
                                 "'<node>:…') can be cancelled", job_id=job_id)
        first = await self.broker.cancel(job_id, mark)
        if first is None:
            log.info("job %s cancelled by %r", job_id, name)
            return JSONResponse({"job_id": job_id, "cancelled": True})
        return JSONResponse({"job_id": job_id, "cancelled": False, "mark": first or None})

    async def leave_blob(self, request: Request) -> Response:
        ip = _ip(request)
        self.ips.check(ip)
        data = await read_body(request, self.settings.blob_body_max)
        self.blobs.check(ip, max(1, len(data)))
        return JSONResponse({"key": await self.broker.leave(data)})

    async def take_blob(self, request: Request) -> Response:
        self.ips.check(_ip(request))
        data = await self.broker.take(check_blob_key(request.path_params["key"]))
        return Response(data, media_type="application/octet-stream")

    async def models(self, request: Request) -> Response:
        self.ips.check(_ip(request))
        return JSONResponse({"models": await self.broker.models()})


def make_app(settings: EdgeSettings, *, keyring: Keyring | None = None, broker: EdgeBroker | None = None
             ) -> Starlette:
    """The edge as an ASGI app (``uvicorn.run(make_app(settings))``)."""
    edge = Edge(settings, keyring or Keyring(settings.users),
                broker or EdgeBroker(settings.broker, max_waiters=settings.max_waiters,
                                     send_threads=settings.send_threads))
    routes: list[BaseRoute] = [
        Route("/healthz", edge.healthz, methods=["GET"]),
        Route("/v1/gateway", edge.gateway, methods=["GET"]),
        Route("/v1/search", edge.search, methods=["POST"]),
        Route("/v1/jobs", edge.submit, methods=["POST"]),
        Route("/v1/jobs/{job_id}", edge.job, methods=["GET"]),
        Route("/v1/jobs/{job_id}/cancel", edge.cancel, methods=["POST"]),
        Route("/v1/blobs", edge.leave_blob, methods=["POST"]),
        Route("/v1/blobs/{key}", edge.take_blob, methods=["GET"]),
        Route("/v1/models", edge.models, methods=["GET"]),
    ]
    if settings.static is not None and settings.static.is_dir():
        routes.append(Mount("/", app=StaticFiles(directory=settings.static, html=True), name="static"))
    handlers = {GridError: refused, HTTPException: http_error, RedisError: broker_failed, KombuError: broker_failed}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=edge.lifespan)


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused past ``limit`` bytes: on its Content-Length, before reading,
    and while reading (a body sent in chunks declares none)."""
    check_length(request.headers.get("content-length"), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body is over {limit} bytes, the most this route takes")
        chunks.append(chunk)
    return b"".join(chunks)


async def refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GridError)
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, TooMany) else None
    log.debug("%s %s refused: %s", request.method, request.url.path, exc)
    return JSONResponse(error_body(exc), status_code=http_status(exc), headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, a method it does not take) in the edge's form."""
    assert isinstance(exc, HTTPException)
    error: GridError = NotFound(f"no {request.url.path}") if exc.status_code == 404 else InvalidRequest(exc.detail)
    return JSONResponse(error_body(error), status_code=exc.status_code, headers=exc.headers)


async def broker_failed(request: Request, exc: Exception) -> Response:
    log.warning("broker: %s: %s", type(exc).__name__, exc)
    error = BrokerUnavailable(f"the edge could not reach the grid's broker ({type(exc).__name__}); try again shortly")
    return JSONResponse(error_body(error), status_code=503)


def _ip(request: Request) -> str:
    return request.client.host if request.client else "?"
