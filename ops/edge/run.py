"""Serving the edge with uvicorn (``gridq edge``)."""

from __future__ import annotations

import logging

import uvicorn

from ops.edge.app import make_app
from ops.edge.settings import EdgeSettings


def run_edge(settings: EdgeSettings, loglevel: str = "INFO") -> None:
    """Serve until SIGTERM or Ctrl-C. Client addresses are the connection's own: proxy headers
    (X-Forwarded-For) are not trusted, so no client can pick the address it is limited by."""
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(
        make_app(settings), host=settings.host, port=settings.port, log_level=loglevel.lower(),
        access_log=settings.access_log, proxy_headers=False, server_header=False, lifespan="on",
        limit_concurrency=settings.max_waiters + 100,  # beyond: 503 at once, before any route runs
        timeout_graceful_shutdown=3,  # long-polls are cut short when stopping
    )
    uvicorn.Server(config).run()
