"""Nothing readable that is not released: a node's training and evaluation figures (loss,
accuracy) travel sealed to the requester, and no reply body shows in a worker's log or in
the task events Flower reads. Checked on what a real node worker left in Redis (the raw
``celery-task-meta-*`` values), on the events it published, and in its log file."""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import pytest
import redis
import torch
from celery import Celery
from torch import nn

from ops.keys import read_identity
from ops.local import LocalGrid
from protocol.errors import BadSignature
from protocol.messages import SealedMetrics, TrainMetrics


class Events:
    """Every Celery event published on the broker while it runs (what Flower receives)."""

    def __init__(self, app: Celery) -> None:
        self.seen: list[dict[str, Any]] = []
        self._conn = app.connection_for_read()
        self._receiver = app.events.Receiver(self._conn, handlers={"*": self.seen.append})
        self._thread = threading.Thread(target=self._receiver.capture, kwargs={"limit": None, "timeout": None},
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15  # subscribed once a worker's heartbeat (every 2 s) comes in
        while not any(e.get("type") == "worker-heartbeat" for e in list(self.seen)):
            assert time.monotonic() < deadline, "no worker heartbeat came through the event receiver"
            time.sleep(0.1)

    def stop(self) -> list[dict[str, Any]]:
        self._receiver.should_stop = True
        self._thread.join(timeout=10)
        self._conn.release()
        return self.seen


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def task_metas(client: redis.Redis) -> dict[str, bytes]:
    return {k.decode(): v for k in client.scan_iter("celery-task-meta-*") if (v := client.get(k)) is not None}


def figures(m: TrainMetrics) -> list[bytes]:
    """How the node would have written these figures in a plaintext JSON reply."""
    values = [m.loss] + ([m.accuracy] if m.accuracy is not None else [])
    return [json.dumps(v).encode() for v in values]


def test_training_and_evaluation_figures_travel_sealed(local_grid: LocalGrid):
    client = redis.Redis.from_url(local_grid.url)
    before = set(task_metas(client))
    with local_grid.connect("alice") as grid:
        digits = grid.search("#digits")["hospital"][0]
        x, y = digits[:, :64], digits[:, 64]
        events = Events(grid.app)
        try:
            ticket = grid.send(mlp(), "hospital").train(x, y, epochs=1, lr=0.05)  # weights kept at the node
            sealed = ticket.reply(timeout=60).metrics
            assert isinstance(sealed, SealedMetrics)
            kept = ticket.metrics()
            assert kept == sealed.open(grid.identity, ticket.id)
            fit = grid.fit(mlp(), data=[(x, y)], rounds=1, lr=0.05, progress=False, evaluate=[(x, y)])
        finally:
            seen = events.stop()
    # the requester reads the figures ...
    assert kept.samples == digits.shape[0] and kept.loss > 0 and 0.0 <= (kept.accuracy or -1) <= 1.0
    (trained,) = fit.history
    assert trained.status == "done" and trained.samples == digits.shape[0] and trained.loss > 0
    evaluated = fit.evaluations[0].nodes["hospital"]
    assert evaluated.samples == digits.shape[0] and evaluated.accuracy is not None
    # ... and no one else: not another user of the node
    with pytest.raises(BadSignature):
        sealed.open(read_identity(local_grid.keys / "bob.key"), ticket.id)

    # what the node left in the result backend: ciphertext where the figures were
    metas = {k: v for k, v in task_metas(client).items() if k not in before}
    client.close()
    leaked = [TrainMetrics(samples=0, loss=trained.loss, accuracy=trained.accuracy), kept, evaluated]
    replies = set()
    for key, raw in metas.items():
        for word in (b"loss", b"accuracy", b"samples"):
            assert word not in raw, f"{key} carries {word!r} in plaintext"
        for figure in (f for m in leaked for f in figures(m)):
            assert figure not in raw, f"{key} carries the figure {figure!r} in plaintext"
        envelope = json.loads(raw)["result"]
        # alice's replies: the backend is the session grid's, where another test's late job
        # (a refusal to another user, say) may land while this one runs
        if envelope["kind"] == "job_reply" and envelope["recipient"] == "alice":
            body = json.loads(envelope["body"])
            assert body["status"] == "done" and set(body["metrics"]) == {"sealed"}
            replies.add(key)
    assert len(replies) == 3, "the training job, the round's job and the evaluation's job"

    # Flower's view: the events of these jobs (and of the gateway's answers) carry no reply body
    ids = {key.removeprefix("celery-task-meta-") for key in replies}
    succeeded = [e for e in seen if e.get("type") == "task-succeeded"]
    assert ids <= {e.get("uuid") for e in succeeded}
    for event in succeeded:
        shown = str(event.get("result"))
        assert len(shown) <= 8 and not re.search(r"[A-Za-z0-9]", shown), f"an event shows the reply: {shown!r}"

    # the node's log: the success line, without the reply
    log = local_grid.logs / "hospital.log"
    deadline = time.monotonic() + 10
    while f"[{ticket.id}] succeeded" not in log.read_text():
        assert time.monotonic() < deadline, "the node never logged the job's success"
        time.sleep(0.1)
    lines = [line for line in log.read_text().splitlines() if f"[{ticket.id}] succeeded" in line]
    assert len(lines) == 1
    assert re.search(r"succeeded in [0-9.e-]+s$", lines[0]), lines[0]
    text = log.read_text()
    for job_id in ids:
        assert all("'body'" not in line and "sealed" not in line for line in text.splitlines() if job_id in line)
