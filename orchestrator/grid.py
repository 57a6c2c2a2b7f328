"""The data scientist's entry point: connect to a grid, find data, compute on it remotely.

    >>> from orchestrator import Grid
    >>> grid = Grid.connect("redis://localhost:6379/0", identity="~/.gridq/alice.key")  # doctest: +SKIP
    >>> births = grid.search("#birth-records", "#february")["hospital"][0]             # doctest: +SKIP
    >>> births["weight"].mean().get()                                                   # doctest: +SKIP
    tensor(3.4127)

Everything the grid answers is signed: gateway answers with the gateway's key (given as
``gateway_key=``, or read from Redis at connect and pinned on first contact in
``$GRIDQ_HOME/known_gateways``, as ssh's known_hosts), node answers with the node's key as
registered at the gateway.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from orchestrator import evaluation, fl, mpc
from orchestrator.evaluation import Evaluation
from orchestrator.fl import FitResult, ModelPointer
from orchestrator.pointer import DataPointer, Expression, JobTicket, mock_twin, submit
from orchestrator.releases import dp_release
from orchestrator.session import Answers, Job, TransportSession
from orchestrator.strategies import Strategy
from orchestrator.transport import Transport
from protocol.contract import (
    ALIVE_TTL_SECONDS,
    Tasks,
    gridq_home,
)
from protocol.envelope import Envelope
from protocol.errors import BrokerUnavailable, InvalidRequest, NodeUnavailable, NotFound
from protocol.identity import Identity, PublicIdentity, unreadable_key
from protocol.messages import (
    BudgetInfo,
    BudgetQuery,
    CancelRequest,
    DatasetMeta,
    DPConfig,
    MyRequests,
    NodeInfo,
    RequestInfo,
    SearchQuery,
    TrainConfig,
    checked,
)
from protocol.model import describe_model
from protocol.mpc.wire import ModelCard
from protocol.plan import InputRef, TensorSpec

if TYPE_CHECKING:
    from celery import Celery

JOB_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}:[0-9a-f]{32}")
# How long grid.requests() asked of every node waits for their answers (at most the grid's timeout):
# an idle node answers in milliseconds, and one that has not by then is named, not waited for
REQUESTS_WAIT_SECONDS = 5.0


class RequestList(list[RequestInfo]):
    """Your requests as :meth:`Grid.requests` lists them — a list, oldest first — and
    ``missing``: the nodes asked that did not answer in time (node → why), whose requests are
    not in it. Shown with them when there are any."""

    def __init__(self, requests: Iterable[RequestInfo] = (), missing: dict[str, str] | None = None) -> None:
        super().__init__(requests)
        self.missing: dict[str, str] = dict(missing or {})

    def __repr__(self) -> str:
        shown = super().__repr__()
        return f"RequestList({shown}, missing {sorted(self.missing)})" if self.missing else shown


def _oldest_first(requests: Iterable[RequestInfo]) -> list[RequestInfo]:
    return sorted(requests, key=lambda r: (r.created_at, r.id))


def key_path(identity: str | Path) -> Path:
    """A key file's path; a bare name (``"alice"``) is ``$GRIDQ_HOME/keys/alice.key``, and a
    bare file name (``"alice.pub"``, given by mistake) is looked for there too."""
    text = str(identity)
    if "/" not in text and text.endswith(".pub") and not Path(text).exists():
        return gridq_home() / "keys" / text  # read, to say which file to give instead
    if "/" not in text and not text.endswith((".key", ".pub")):
        return gridq_home() / "keys" / f"{text}.key"
    return Path(text).expanduser()


def read_key(file: Path) -> Identity:
    """A secret key file's identity, refused if others may read it (as ssh refuses one)."""
    try:
        status, text = file.stat(), file.read_text()
    except OSError as exc:
        raise unreadable_key(file, exc) from None
    return Identity.from_key_file(file, text, status.st_mode, status.st_uid == os.getuid())


class Grid:
    """A connection to a grid, acting as one identity. What travels, and how, is
    :class:`~orchestrator.transport.Transport`'s (``grid.transport``).

    It builds pointers, tickets, federated runs and MPC requests on its session
    (:class:`~orchestrator.session.TransportSession`, ``grid.session``), and is a
    :class:`~orchestrator.session.Session` itself: what takes a session takes a grid."""

    def __init__(self, transport: Transport) -> None:
        self.session = TransportSession(transport)

    @classmethod
    def connect(cls, url: str | None = None, identity: str | Path | Identity | None = None, *,
                gateway_key: str | None = None, timeout: float = 60.0) -> Grid:
        """Connect to the grid whose broker is at ``url`` (default: ``$GRIDQ_BROKER``), as the
        identity in a key file: a path, or a name such as ``"alice"`` for
        ``$GRIDQ_HOME/keys/alice.key`` (``GRIDQ_HOME`` defaults to ``~/.gridq``).

        The gateway's key is ``gateway_key`` (``gridq1:…``, from the grid's operator) if given;
        else the one the broker posts, pinned on first contact in ``$GRIDQ_HOME/known_gateways``:
        a different one later raises ``GatewayKeyChanged`` (``gridq trust-gateway`` accepts
        a rotation)."""
        url = url or os.environ.get("GRIDQ_BROKER")
        if not url:
            raise InvalidRequest("no broker URL: pass Grid.connect(url, ...) or set GRIDQ_BROKER "
                                 "(`gridq up` prints the line to paste)")
        if identity is None:
            raise InvalidRequest("whose identity? pass identity=\"alice\" (a key in $GRIDQ_HOME/keys) or a key file")
        me = identity if isinstance(identity, Identity) else read_key(key_path(identity))
        return cls(Transport.connect(url, me, gateway_key=gateway_key, timeout=timeout))

    @property
    def transport(self) -> Transport:
        return self.session.transport

    @property
    def identity(self) -> Identity:
        return self.session.identity

    @property
    def timeout(self) -> float:
        return self.session.timeout

    @property
    def app(self) -> Celery:
        """The Celery app under the transport (operator tools and tests use it directly)."""
        return self.transport.app

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Grid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the registry -----------------------------------------------------------------------

    def search(self, *tags: str, words: tuple[str, ...] | list[str] = (), node: str | None = None
               ) -> dict[str, list[DataPointer]]:
        """Datasets carrying every tag (``"#february"``) and every word of their description."""
        query = checked(SearchQuery, tags=list(tags), words=list(words), node=node)
        reply = self.transport.ask_gateway(Tasks.SEARCH, query.model_dump(mode="json"))
        found: dict[str, list[DataPointer]] = {}
        for meta in reply.datasets:
            found.setdefault(meta.node, []).append(self._pointer(meta))
        return found

    def datasets(self) -> list[DataPointer]:
        return [p for ptrs in self.search().values() for p in ptrs]

    def nodes(self) -> list[NodeInfo]:
        return self.transport.nodes()

    def budget(self, node: str, dataset: str | None = None) -> list[BudgetInfo]:
        """Your privacy budget at ``node``: on one dataset, or on each one it publishes."""
        ticket = self.submit(node, BudgetQuery(dataset=dataset))
        return list(ticket.reply().budgets)

    # --- your requests in the nodes' approval queues -------------------------------------------

    def requests(self, node: str | None = None, status: str | None = None) -> RequestList:
        """Your own requests in the approval queue of ``node`` (None: of every node whose
        worker is up), of one ``status`` — ``pending``, ``approved``, ``denied``, ``expired``,
        ``cancelled`` — or all, oldest first: each with its id (its ticket's), kind, datasets,
        release, status, when it was sent and decided, and when a pending one expires (the
        node's ``[approval] expire_after``). Nobody else's requests are ever shown.

        Asked of every node, they are asked at once and waited for ``REQUESTS_WAIT_SECONDS``
        (at most the grid's timeout): a node that says nothing by then — its worker killed
        since it last said it was up, or busy — is left out and named in the list's
        ``missing`` (node → why), as ``Evaluation.missing`` names the nodes an evaluation went
        on without. Asked of one ``node``, it is waited for up to the timeout, and one that
        does not answer raises ``NodeUnavailable``."""
        query = checked(MyRequests, status=status)
        if node is not None:
            return RequestList(_oldest_first(self.submit(node, query).reply().requests))
        tickets: list[JobTicket] = []
        for info in self.nodes():
            try:
                tickets.append(self.submit(info.node, query))
            except BrokerUnavailable:
                raise
            except NodeUnavailable:  # no worker serves its job queue (down, or an MPC-only node): nothing to list
                continue
        wait = min(self.timeout, REQUESTS_WAIT_SECONDS)
        answered = self.session.answers([t.id for t in tickets], wait)
        found: list[RequestInfo] = []
        missing: dict[str, str] = {}
        for ticket in tickets:
            if ticket.id not in answered:
                missing[ticket.node] = (f"no answer within {wait:g} s: its worker may have stopped in the last "
                                        f"{ALIVE_TTL_SECONDS:g} s (it still counts as up), or be busy; asked alone, "
                                        f"it is waited for up to {self.timeout:g} s")
                continue
            meta = answered[ticket.id][1]
            found.extend(JobTicket.finished(self.session, ticket.id, meta["status"], meta["result"]).reply().requests)
        return RequestList(_oldest_first(found), missing)

    def cancel_request(self, request_id: str) -> RequestInfo:
        """Withdraw your pending request ``request_id`` (its ticket's id) from its node's
        approval queue: it never runs, its owner no longer sees it waiting, and its ticket
        raises ``JobCancelled``. ``PermissionDenied`` if it is another user's request,
        ``InvalidRequest`` if it was decided or expired already (cancelling it twice is no
        error), ``NotFound`` if the node has no such request. ``request_id`` may be a unique
        prefix of one of yours (``node:`` and some hex digits), as ``gridq requests`` takes
        an owner's. The request, as it now stands."""
        node, _, digits = request_id.partition(":")
        if not JOB_ID.fullmatch(request_id):
            if not digits or not JOB_ID.fullmatch(f"{node}:{digits.ljust(32, '0')}"):
                raise InvalidRequest(f"{request_id!r} is not a request id: they read '<node>:<32 hex digits>' (or a "
                                     "prefix of one of yours), as ticket.id and grid.requests() show them")
            mine = [r.id for r in self.requests(node) if r.id.startswith(request_id)]
            if len(mine) != 1:
                error = NotFound if not mine else InvalidRequest
                raise error(f"{request_id!r} names {len(mine)} of your requests at {node!r}"
                            + (f" ({', '.join(mine)}): give more of the id" if mine else
                               "; grid.requests() lists yours"))
            request_id = mine[0]
        reply = self.submit(node, CancelRequest(request=request_id)).reply()
        return reply.requests[0]

    # --- federated learning (orchestrator.fl) -------------------------------------------------

    def send(self, model: torch.nn.Module, node: str) -> ModelPointer:
        """A pointer to ``model`` at ``node``: train it there with ``.train(x, y, ...)``."""
        self.transport.node_key(node)
        return ModelPointer(self.session, model, node)

    def fit(self, model: torch.nn.Module, data: Sequence[tuple[Expression, Expression]], *, rounds: int,
            strategy: Strategy | str = "fedavg", train: TrainConfig | None = None, local_epochs: int = 1,
            batch_size: int = 32, lr: float = 0.01, optimizer: str = "sgd", loss: str = "cross_entropy",
            momentum: float = 0.0, min_nodes: int = 1, round_timeout: float = 120.0, seed: int = 0,
            sample_fraction: float = 1.0, min_sampled: int = 1, evaluate: Sequence[tuple[Expression, Expression]] = (),
            dp: DPConfig | None = None, secure_aggregation: bool = False, aggregators: Sequence[str] = (),
            checkpoint_every: int = 0, resume: str | None = None, progress: bool = True,
            history_db: str | None = None) -> FitResult:
        """Train ``model`` over ``data`` — (x, y) pointers, one pair per node — for ``rounds``
        rounds, nodes in parallel, combining their updates as ``strategy`` says (FedAvg(),
        FedProx(mu=…), FedAdam(lr=…), FedMedian(), FedTrimmedAvg(beta=…), Krum(byzantine=…)
        from orchestrator, or "fedavg"/"fedadam"/"fedmedian"/"fedtrimmedavg" for their
        defaults). Local training: ``train=TrainConfig(…)``, or the keywords local_epochs,
        batch_size, lr, optimizer, loss, momentum. A round closes when every node asked has
        answered, or after ``round_timeout`` with ``min_nodes`` answers; ``sample_fraction``
        of the nodes (at least ``min_sampled``) are asked each round. ``evaluate``: (x, y)
        pointers to held-out data at nodes, where the global model is evaluated after every
        round; ``dp``: DP-SGD at the nodes; ``secure_aggregation`` with ``aggregators`` (MPC
        pool nodes that add up shares of the updates); ``checkpoint_every``/``resume``: keep
        the global model every N rounds and go on from the last one; ``history_db``: where
        the run's history is kept (default ``$GRIDQ_HOME/runs.db``)."""
        return fl.fit(self.session, model, data, rounds=rounds, strategy=strategy, train=train,
                      local_epochs=local_epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, loss=loss,
                      momentum=momentum, min_nodes=min_nodes, round_timeout=round_timeout, seed=seed,
                      sample_fraction=sample_fraction, min_sampled=min_sampled, evaluate=evaluate, dp=dp,
                      secure_aggregation=secure_aggregation, aggregators=aggregators,
                      checkpoint_every=checkpoint_every, resume=resume, progress=progress, history_db=history_db)

    def evaluate(self, model: torch.nn.Module, data: Sequence[tuple[Expression, Expression]], *,
                 loss: str = "cross_entropy", timeout: float | None = None, epsilon: float | None = None,
                 delta: float = 0.0, loss_bound: float = 10.0) -> Evaluation:
        """``model``'s loss (and accuracy, for classification) on ``data`` — (x, y) pointers,
        one pair per node — computed at the nodes in parallel, weighted by their samples. The
        figures are released as trained weights are (allowed users, or the owner's approval);
        with ``epsilon`` (and ``delta``), with DP noise instead, charged to your budget: the
        mean of each sample's loss clamped to [0, ``loss_bound``], and the accuracy."""
        spec, state = describe_model(model)
        release = dp_release(epsilon, delta)
        return evaluation.evaluate(self.session, spec, state, data, loss=loss, timeout=self.timeout if timeout is None
                                   else timeout, label=f"[evaluation of {self.identity.name}]", release=release,
                                   loss_bound=loss_bound)

    # --- encrypted ML-as-a-service (orchestrator.mpc) ----------------------------------------

    def serve(self, model: torch.nn.Module, *, name: str, parties: Sequence[str], crypto_provider: str,
              host: str, queriers: Sequence[str] = (), frac_bits: int = 16) -> ModelCard:
        """Serve ``model`` (Linear and ReLU layers) secret-shared among ``parties``: ``host``
        keeps its structure and coordinates queries, ``crypto_provider`` deals the
        correlated randomness, and ``queriers`` (and you) may query it."""
        return mpc.serve(self.session, model, name=name, parties=parties, crypto_provider=crypto_provider, host=host,
                         queriers=queriers, frac_bits=frac_bits)

    def models(self) -> list[ModelCard]:
        """The models served encrypted on this grid."""
        return mpc.models(self.session)

    def query(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The served model's output on ``x`` (one row or a batch), computed on shares:
        nobody but you sees ``x`` or the result."""
        return mpc.query(self.session, name, x)

    def ticket(self, job_id: str) -> JobTicket:
        """Pick up a job submitted earlier (by this process or another one)."""
        if not JOB_ID.fullmatch(job_id):
            raise InvalidRequest(f"{job_id!r} is not a job id: they read '<node>:<32 hex digits>', as "
                                 "ticket.id prints them")
        self.transport.node_key(job_id.split(":")[0])  # a node this grid knows
        if not self.transport.sent(job_id):
            raise NotFound(f"no job {job_id} was sent on this broker, or it is older than its result's lifetime "
                           f"({self.app.conf.result_expires or 86400:.0f} s): check the id (ticket.id prints it)")
        return JobTicket(self.session, job_id)

    def submit(self, node: str, job: Job) -> JobTicket:
        """Send one job to ``node`` (pointers and models build them): its ticket, at once."""
        return submit(self.session, node, job)

    def mock(self, node: str, dataset: str) -> torch.Tensor:
        """A dataset's mock twin, fetched once (it is public)."""
        return mock_twin(self.session, node, dataset)

    def _pointer(self, meta: DatasetMeta) -> DataPointer:
        return DataPointer(self.session, meta.node, InputRef(kind="dataset", name=meta.name),
                           TensorSpec(shape=meta.shape, dtype=meta.dtype), meta)

    # --- the session it is too (orchestrator.session): what takes a session takes a grid ----------

    @property
    def mocks(self) -> dict[tuple[str, str], torch.Tensor]:
        return self.session.mocks

    def node_key(self, node: str) -> PublicIdentity:
        return self.session.node_key(node)

    def send_job(self, node: str, job: Job) -> str:
        return self.session.send_job(node, job)

    def send_jobs(self, jobs: Sequence[tuple[str, Job]], *, ttl: float, label: str) -> dict[str, str]:
        return self.session.send_jobs(jobs, ttl=ttl, label=label)

    def answers(self, job_ids: Sequence[str], timeout: float, also: tuple[str, ...] = ()) -> Answers:
        return self.session.answers(job_ids, timeout, also)

    def verify(self, raw: Any, node: str, job_id: str) -> Envelope:
        return self.session.verify(raw, node, job_id)

    def leave(self, data: bytes) -> str:
        return self.session.leave(data)

    def claim(self, key: str) -> bytes:
        return self.session.claim(key)
