"""The Celery app Flower runs with: gridq's settings (msgpack/JSON, never pickle), on the
broker named by ``GRIDQ_BROKER``. A bare ``celery flower`` would accept JSON only and fail
to read the workers' msgpack replies."""

import os

from orchestrator.app import make_celery

app = make_celery(os.environ.get("GRIDQ_BROKER", "redis://127.0.0.1:6379/0"), name="gridq-flower")
