"""The data owner's node: its datasets, its store, and its link to the gateway.

    >>> node = Node.from_config("hospital.toml")                       # doctest: +SKIP
    >>> node.publish("births-mar", table, columns=["weight", "height"],
    ...              tags=["#march", "#birth-records"], allowed_users=["alice"])
    >>> [d.name for d in node.datasets()]
    ['birth-records-feb', 'births-mar']

Only metadata (name, shape, dtype, columns, description, tags) ever leaves the node.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from celery import Celery

from protocol.codec import dtype_name
from protocol.contract import (
    GATEWAY,
    GATEWAY_QUEUE,
    Tasks,
    celery_settings,
    node_queue,
)
from protocol.envelope import seal_envelope
from protocol.errors import InvalidRequest, RequestDenied
from protocol.identity import PublicIdentity
from protocol.messages import DatasetMeta, PublishDataset, RegisterNode, UnpublishDataset
from workers import claims
from workers.approvals import Requests
from workers.config import Bounds, NodeConfig, load_config
from workers.context import NodeContext
from workers.datasets import load_table
from workers.directory import Directory
from workers.jobs import JobRunner
from workers.ledger import Ledger
from workers.store import RequestRow, Store
from workers.tasks import serve_tasks


def make_celery(config: NodeConfig) -> Celery:
    """The node's Celery app: the shared settings, its own queue as default."""
    app = Celery(f"gridq-node-{config.id}", broker=config.node.broker, backend=config.node.broker,
                 set_as_current=False)
    w = config.worker
    app.conf.update(celery_settings(time_limit=w.time_limit, visibility_timeout=w.visibility_timeout,
                                    restore_interval=w.restore_interval))
    app.conf.task_default_queue = node_queue(config.id)
    return app


class Node:
    """A data owner's node, for use from Python (the worker uses the same object)."""

    def __init__(self, config: NodeConfig, app: Celery | None = None) -> None:
        self.config = config
        self.id = config.id
        self.identity = config.identity()
        self.store = Store(config.node.store, config.database_url)
        self.ledger = Ledger(self.store, config.id, config.budget)
        self._app = app
        self._redis: redis.Redis | None = None
        self._directory: Directory | None = None

    @classmethod
    def from_config(cls, path: str | Path) -> Node:
        return cls(load_config(path))

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = make_celery(self.config)
        return self._app

    def close(self) -> None:
        self.store.close()
        if self._redis is not None:
            self._redis.close()

    # --- the owner's API -----------------------------------------------------------------

    def publish(self, name: str, data: torch.Tensor | np.ndarray | str | Path, *, description: str = "",
                tags: list[str] | tuple[str, ...] = (), allowed_users: list[str] | tuple[str, ...] = (),
                columns: list[str] | None = None, bounds: Bounds | None = None,
                mock: torch.Tensor | np.ndarray | str | Path | None = None, notify: bool = True) -> DatasetMeta:
        """Publish a dataset: the values stay here, the metadata goes to the gateway.

        ``bounds`` (per column name, or one ``(lo, hi)`` for every value) are what DP
        releases rest on; they are public, like the shape. ``mock`` is a synthetic twin with
        the same kind of rows, which scientists may download (else one is drawn within the
        bounds)."""
        if isinstance(data, str | Path):
            tensor, file_columns = load_table(Path(data))
            columns = columns or file_columns
        else:
            tensor = torch.as_tensor(data)
        if columns and (tensor.ndim != 2 or tensor.shape[1] != len(columns)):
            raise InvalidRequest(f"{len(columns)} column names given for data of shape {tuple(tensor.shape)}")
        meta = DatasetMeta(node=self.id, name=name, shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype),
                           columns=list(columns or []), description=description, tags=list(tags),
                           bounds=_bounds_list(bounds, list(columns or []), name))
        twin = None
        if mock is not None:
            twin = load_table(Path(mock))[0] if isinstance(mock, str | Path) else torch.as_tensor(mock)
            if tuple(twin.shape[1:]) != tuple(tensor.shape[1:]) or twin.dtype != tensor.dtype:
                raise InvalidRequest(
                    f"the mock twin of {name!r} must have rows like the data's: {tuple(tensor.shape[1:])} "
                    f"{tensor.dtype}, not {tuple(twin.shape[1:])} {twin.dtype}")
        self.store.put_dataset(meta, tensor, list(allowed_users), twin)
        if notify:
            self._tell_gateway(PublishDataset(dataset=meta))
        return meta

    def datasets(self) -> list[DatasetMeta]:
        return [DatasetMeta.model_validate(row.meta) for row in self.store.dataset_rows()]

    def unpublish(self, name: str) -> None:
        self.store.remove_dataset(name)
        self._tell_gateway(UnpublishDataset(name=name))

    def load_config_datasets(self) -> list[DatasetMeta]:
        """(Re)load the datasets the config names from their files, without telling anyone."""
        return [self.publish(ds.name, ds.path, description=ds.description, tags=ds.tags,
                             allowed_users=ds.allowed_users, columns=ds.columns, bounds=ds.bounds, mock=ds.mock,
                             notify=False)
                for ds in self.config.datasets]

    def register(self) -> None:
        """Announce this node, its public key and its datasets' metadata to the gateway."""
        self._tell_gateway(RegisterNode(public_key=self.identity.public.text(), datasets=self.datasets()))

    # --- the approval queue ----------------------------------------------------------------

    def requests(self, status: str | None = "pending") -> list[RequestRow]:
        """Requests waiting for a decision (``status=None``: every request, decided or not)."""
        return Requests(self.store).list(status)

    def request(self, job_id: str) -> RequestRow:
        return Requests(self.store).get(job_id)

    def approve(self, job_id: str) -> dict[str, Any]:
        """Run the request as it was asked and complete the requester's ticket."""
        job_id = Requests(self.store).decide(job_id, "approved").job_id
        signed = self.runner().run_approved(job_id)
        self.app.backend.store_result(job_id, signed, "SUCCESS")
        return signed

    def deny(self, job_id: str, reason: str) -> None:
        """Refuse the request; the requester's ticket raises RequestDenied with ``reason``."""
        if not reason.strip():
            raise InvalidRequest("say why the request is denied: the requester reads the reason")
        request = Requests(self.store).decide(job_id, "denied", reason)
        job_id = request.job_id
        error = RequestDenied(f"the owner of {self.id!r} denied {request.requester!r}'s {request.kind} request "
                              f"on {', '.join(request.datasets)}: {reason}", job_id=job_id)
        self.app.backend.store_result(job_id, self.runner().refuse(job_id, error), "SUCCESS")

    # --- the worker's side -----------------------------------------------------------------

    def runner(self) -> JobRunner:
        return JobRunner(NodeContext(self.id, self.identity, self.config.keyring(), self.store, self.ledger,
                                     self.config.approval, self._claim_check, self._claim_take, self._node_key))

    @property
    def _broker(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.config.node.broker)
        return self._redis

    def _claim_check(self, sealed: bytes) -> str:
        return claims.leave(self._broker, sealed)

    def _claim_take(self, key: str) -> bytes:
        return claims.take(self._broker, key)

    def _node_key(self, node: str) -> PublicIdentity:
        if self._directory is None:
            self._directory = Directory(self.app, self._broker, timeout=30.0)
        return self._directory.key(node)

    def _tell_gateway(self, body: RegisterNode | PublishDataset | UnpublishDataset) -> None:
        # Fire and forget: the message waits in the gateway's queue if the gateway is down.
        job_id = uuid.uuid4().hex
        env = seal_envelope(self.identity, recipient=GATEWAY, kind=body.kind, job_id=job_id,
                            body=body.model_dump(mode="json"), now=time.time(), ttl=24 * 3600)
        task = {"register": Tasks.REGISTER, "publish": Tasks.PUBLISH, "unpublish": Tasks.UNPUBLISH}[body.kind]
        self.app.send_task(task, args=[env.model_dump(mode="json")], queue=GATEWAY_QUEUE, task_id=job_id)


def _bounds_list(bounds: Bounds | None, columns: list[str], dataset: str) -> list[tuple[float, float]] | None:
    """Declared bounds as one (lo, hi) per column, or a single pair for every value."""
    if bounds is None:
        return None
    if isinstance(bounds, dict):
        unknown = set(bounds) - set(columns)
        missing = [c for c in columns if c not in bounds]
        if unknown or missing:
            raise InvalidRequest(f"bounds of {dataset!r} must name every column {columns} and no other "
                                 f"(unknown: {sorted(unknown)}, missing: {missing})")
        pairs = [tuple(bounds[c]) for c in columns]
    else:
        pairs = [tuple(bounds)]
    for lo, hi in pairs:
        if not lo <= hi:
            raise InvalidRequest(f"bounds of {dataset!r}: lower bound {lo} is above upper bound {hi}")
    return [(float(lo), float(hi)) for lo, hi in pairs]


def worker_tasks(app: Celery, config: NodeConfig) -> None:
    """Register the node's task on ``app``, served by a JobRunner built in each pool
    process after the fork (no database connection is shared across processes)."""

    def runner() -> JobRunner:
        torch.set_num_threads(config.worker.torch_threads)
        return Node(config, app).runner()

    serve_tasks(app, [Tasks.RUN_JOB], runner)
