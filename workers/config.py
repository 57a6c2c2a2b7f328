"""A node's configuration, read from its TOML file.

String values may name environment variables (``${GRIDQ_HOME}``); relative paths are
taken relative to the config file. See ``ops/nodes/hospital.toml`` for an example::

    [node]
    id = "hospital"
    broker = "redis://localhost:6379/0"
    store = "./data/hospital"            # object store + node database live here
    identity = "./keys/hospital.key"

    [users.alice]
    public_key = "gridq1:…"              # or public_key_file = "./keys/alice.pub"

    [[datasets]]
    name = "birth-records-feb"
    path = "./private/births_feb.csv"
    tags = ["#february", "#birth-records"]
    allowed_users = ["alice", "bob", "ana"]
    bounds = { weight = [0.0, 7.0], height = [20.0, 65.0] }   # every value is checked at publish
    # clamp = true                       clamp values outside the bounds instead of refusing them
    # dtype = "float32"                  a CSV loads as float64 unless a dtype is declared
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol.contract import RESULT_TTL_SECONDS, gridq_home
from protocol.envelope import MAX_TTL_SECONDS
from protocol.errors import InvalidRequest
from protocol.identity import Identity, PublicIdentity, unreadable_key
from protocol.messages import JobKind

NAME = r"^[A-Za-z0-9_.\-]+$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSection(_Section):
    id: Annotated[str, Field(pattern=NAME, max_length=64)]
    broker: str = "redis://127.0.0.1:6379/0"
    # or: a file holding the URL — a broker user's password stays out of the config (`gridq up`,
    # docker-compose and `gridq enrol` write one per enrolled node, $GRIDQ_HOME/broker/node-<id>.url)
    broker_file: Path | None = None
    store: Path
    identity: Path
    database: str | None = None  # any SQLAlchemy URL; default: SQLite inside the store


class UserSection(_Section):
    public_key: str | None = None
    public_key_file: Path | None = None
    role: str = "scientist"

    @model_validator(mode="after")
    def _one_key(self) -> UserSection:
        if (self.public_key is None) == (self.public_key_file is None):
            raise ValueError("give exactly one of public_key or public_key_file")
        return self


Bounds = dict[str, tuple[float, float]] | tuple[float, float]


class DatasetSection(_Section):
    name: Annotated[str, Field(pattern=NAME, max_length=128)]
    path: Path
    description: str = ""
    tags: list[str] = []
    allowed_users: list[str] = []
    columns: list[str] | None = None
    # value bounds per column name, or one [lo, hi] for every value: what DP sensitivity rests on
    bounds: Bounds | None = None
    clamp: bool = False  # clamp values outside the bounds to them (recorded at the node), instead of refusing
    dtype: str | None = None  # what the values are stored as (a CSV's default: float64, exact for decimals)
    mock: Path | None = None  # a synthetic twin with the same columns (else drawn within the bounds)

    @field_validator("dtype")
    @classmethod
    def _allowed_dtype(cls, value: str | None) -> str | None:
        from protocol.codec import ALLOWED_DTYPES  # here: reading a config without a dtype loads no torch

        if value is not None and value not in ALLOWED_DTYPES:
            raise ValueError(f"dtype {value!r} is not allowed; use one of {sorted(ALLOWED_DTYPES)}")
        return value


class UserBudget(_Section):
    epsilon: Annotated[float, Field(gt=0)]
    delta: Annotated[float, Field(ge=0, lt=1)] = 1e-6


class BudgetSection(_Section):
    """Privacy budgets per user and dataset: a default, and per-user overrides."""

    default_epsilon: Annotated[float, Field(ge=0)] = 1.0
    default_delta: Annotated[float, Field(ge=0, lt=1)] = 1e-6
    users: dict[str, UserBudget] = {}

    def for_user(self, user: str) -> tuple[float, float]:
        own = self.users.get(user)
        return (own.epsilon, own.delta) if own else (self.default_epsilon, self.default_delta)


class WorkerSection(_Section):
    concurrency: Annotated[int, Field(ge=1, le=64)] = 2  # 2: one requester's heavy plan cannot hold them all
    time_limit: Annotated[float, Field(gt=0)] = 300.0
    visibility_timeout: float | None = None
    restore_interval: Annotated[float, Field(gt=0)] = 10.0
    # torch threads per worker process. One by default: a small job's parallel region
    # otherwise leaves a spinning thread on the core that Redis and Celery need next
    # (measured: 6.7 → 5.3 ms per job, 12.8 → 5.9 ms on a busy machine; ops/bench/RESULTS.md).
    torch_threads: Annotated[int, Field(ge=1, le=256)] = 1
    # A job delivered this many times whose worker died each time (killed for memory, say)
    # is answered with a failure instead of being run again (protocol.inbox)
    max_deliveries: Annotated[int, Field(ge=1, le=100)] = 3
    # The most a plan's steps may hold at once (estimated before it runs, on shapes alone:
    # protocol.interpret.peak_bytes); a larger plan is refused, not run into the OOM killer
    memory_limit_mb: Annotated[int, Field(ge=16)] = 2048

    @property
    def slots_per_user(self) -> int:
        """How many of the worker's processes one requester's jobs may hold at once: all but
        one, so that another requester's job always finds one free (workers.jobs.slots); no cap
        with one process, where nothing could be kept free."""
        return self.concurrency - 1 if self.concurrency > 1 else 0


class RetentionSection(_Section):
    """How long a node keeps what each job leaves behind (``workers.storage.retention``).

    ``results``: seconds a job's answer stays readable — its time to live in the result
    backend, and the expiry of the signed reply (a client refuses an expired one, so a
    result kept longer would be dead weight in Redis). A ticket is picked up with
    ``grid.ticket(id)`` within this; a parked job's answer waits for the owner's decision
    however long that takes. ``replies``: seconds the node keeps a job's reply body so that
    a redelivered job answers the same; then the body goes and the job's row stays, with its
    status (ledger charges and approval requests always stay). Pruned every ``prune_every``
    seconds by the worker, at most ``prune_batch`` rows at a time."""

    results: Annotated[float, Field(gt=0, le=MAX_TTL_SECONDS)] = RESULT_TTL_SECONDS
    replies: Annotated[float, Field(gt=0)] = 24 * 3600.0
    prune_every: Annotated[float, Field(gt=0)] = 60.0
    prune_batch: Annotated[int, Field(ge=1, le=100_000)] = 1000

    @model_validator(mode="after")
    def _replies_outlive_results(self) -> RetentionSection:
        if self.replies < self.results:
            raise ValueError(f"replies ({self.replies:g} s) must be kept at least as long as results "
                             f"({self.results:g} s): a redelivered job must answer as the stored result says")
        return self


# the kinds (protocol.messages.JobKind) an owner may let run without approval, as the TOML spells them
AutoKind = Literal["compute", "raw_if_allowed", "dp", "train"]


class UserApproval(_Section):
    auto: list[AutoKind]


class ApprovalSection(_Section):
    """Which jobs wait for the owner. Kinds: ``compute`` (result kept at the node),
    ``raw_if_allowed`` (exact value for an allowed user), ``dp`` (a DP release), ``train``
    (trained weights released to a user who may not see the data raw), ``raw`` (exact value
    for anyone else: the approved door) and ``access`` (a request to become an allowed
    user). ``raw`` and ``access`` always wait; ``train`` runs at once only if listed in
    ``auto``; with ``default = "auto"`` the others run at once, with ``"manual"`` only the
    ``auto`` kinds do.

    ``expire_after``: seconds a request waits in the approval queue for a decision (default
    a week: an owner away for a weekend still finds it). Past it the request is closed as
    ``expired`` — the owner can no longer approve it, and its requester's ticket raises
    ``RequestExpired`` (send the work again). The worker closes and answers expired requests
    as it runs (``workers.policy.approvals.sweep_every`` apart) and at every start. ``0``: requests
    never expire. A deadline is ``created_at + expire_after`` under the config in force: a
    longer ``expire_after`` also keeps requests already waiting."""

    default: Literal["auto", "manual"] = "auto"
    auto: list[AutoKind] = ["compute", "raw_if_allowed", "dp"]
    users: dict[str, UserApproval] = {}
    expire_after: Annotated[float, Field(ge=0)] = 7 * 24 * 3600.0

    def automatic(self, user: str, kind: JobKind) -> bool:
        if kind in (JobKind.RAW, JobKind.ACCESS):
            return False
        own = self.users.get(user)
        listed = own.auto if own else self.auto
        if kind == JobKind.TRAIN:  # weights trained on data the user may not see: only if the owner listed it
            return kind in listed
        if self.default == "auto" and user not in self.users:
            return True
        return kind in listed


class MpcSection(_Section):
    """The node's part in the MPC pool (``gridq mpc start``): as a host, how long it waits
    for a party's round or the crypto provider before failing with ``NodeUnavailable``, and
    how many dealer bundles it keeps ready per shape; as a party, how many sessions it runs
    at once."""

    # a broker URL for the MPC worker, or a file holding one; default: the node's (its broker
    # user consumes both node.<id> and mpc.<id>)
    broker: str | None = None
    broker_file: Path | None = None
    round_timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0
    deal_timeout: Annotated[float, Field(gt=0, le=3600)] = 120.0
    pool_size: Annotated[int, Field(ge=0, le=64)] = 4  # refilled when half are used, not after each query
    # processes serving other nodes' MPC workers (mpc-peer.<id>): sessions run at once as a
    # party. One is enough to never stall (a host dispatches a session to all its parties at
    # once, in one order grid-wide); more lets queries of different hosts overlap
    sessions: Annotated[int, Field(ge=1, le=16)] = 1


class NodeConfig(_Section):
    node: NodeSection
    users: dict[str, UserSection] = {}
    datasets: list[DatasetSection] = []
    worker: WorkerSection = WorkerSection()
    budget: BudgetSection = BudgetSection()
    approval: ApprovalSection = ApprovalSection()
    mpc: MpcSection = MpcSection()
    retention: RetentionSection = RetentionSection()

    @property
    def id(self) -> str:
        return self.node.id

    @property
    def database_url(self) -> str:
        return self.node.database or f"sqlite:///{self.node.store / 'node.db'}"

    def identity(self) -> Identity:
        """The node's secret key, refused if others may read its file (as ssh refuses one)."""
        file = self.node.identity
        try:
            status, text = file.stat(), file.read_text()
        except OSError as exc:
            raise unreadable_key(file, exc) from None
        return Identity.from_key_file(file, text, status.st_mode, status.st_uid == os.getuid())

    def for_mpc(self) -> NodeConfig:
        """This config as the node's MPC worker connects: with ``[mpc]``'s broker, if it has one."""
        if self.mpc.broker is None:
            return self
        return self.model_copy(update={"node": self.node.model_copy(update={"broker": self.mpc.broker})})

    def keyring(self) -> dict[str, PublicIdentity]:
        """The users this node knows, by name."""
        ring = {}
        for name, user in self.users.items():
            text = user.public_key
            if text is None:
                assert user.public_key_file is not None
                text = _public_text(user.public_key_file.read_text())
            ring[name] = PublicIdentity.parse(name, text.strip())
        return ring


def _public_text(file_text: str) -> str:
    """A public key file holds the key itself; a secret key file also carries it."""
    stripped = file_text.strip()
    if stripped.startswith("{"):
        return Identity.from_json(stripped).public.text()
    return stripped


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        expanded = os.path.expandvars(os.path.expanduser(value))
        missing = re.search(r"\$\{?(\w+)", expanded)
        if missing:
            raise InvalidRequest(f"the config uses ${{{missing.group(1)}}}, which is not set in the environment")
        return expanded
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    return value


def _anchor(config: NodeConfig, base: Path) -> NodeConfig:
    def at(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    config.node.store = at(config.node.store)
    config.node.identity = at(config.node.identity)
    if config.node.broker_file is not None:
        config.node.broker = _read_url(at(config.node.broker_file))
    if config.mpc.broker_file is not None:
        config.mpc.broker = _read_url(at(config.mpc.broker_file))
    for user in config.users.values():
        if user.public_key_file is not None:
            user.public_key_file = at(user.public_key_file)
    for ds in config.datasets:
        ds.path = at(ds.path)
        ds.mock = at(ds.mock) if ds.mock else None
    return config


def _read_url(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise InvalidRequest(f"broker_file {path} does not exist: `gridq up` (or `gridq acl init`) writes the "
                             "broker's URLs there, a node's (broker/node-<id>.url) once the gateway's operator has "
                             "enrolled it (`gridq enrol`)") from None


def config_path(given: str | Path) -> Path:
    """A node config's path; a bare node name (``hospital``) is ``$GRIDQ_HOME/nodes/hospital.toml``,
    where ``gridq up`` writes the configs of its nodes."""
    text = str(given)
    if "/" not in text and not text.endswith(".toml") and not Path(text).exists():
        return gridq_home() / "nodes" / f"{text}.toml"
    return Path(text).expanduser()


def load_config(path: str | Path) -> NodeConfig:
    """Read a node config; errors name the file and the offending field."""
    path = config_path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidRequest(f"node config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"node config {path} is not valid TOML: {exc}") from None
    try:
        config = NodeConfig.model_validate(_expand(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"node config {path}: {where}: {first['msg']}") from None
    return _anchor(config, path.parent.resolve())
