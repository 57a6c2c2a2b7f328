"""The client's (and the gateway's) Celery app, built from the wire contract."""

from __future__ import annotations

from celery import Celery

from protocol.contract import celery_settings


def make_celery(broker: str, name: str = "gridq-client") -> Celery:
    app = Celery(name, broker=broker, backend=broker, set_as_current=False)
    app.conf.update(celery_settings())
    return app
