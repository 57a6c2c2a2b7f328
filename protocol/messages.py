"""Message bodies: a pydantic v2 discriminated union on ``kind``, every growable field capped.

The envelope (:mod:`protocol.envelope`) carries one of these as its body. Bodies are
parsed with :func:`parse_body` only after the envelope is verified.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
)

from protocol.errors import BadSignature, InvalidRequest
from protocol.identity import Identity, PublicIdentity
from protocol.model_spec import ModelSpec
from protocol.plan import Plan

Text = Annotated[str, Field(max_length=4096)]
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-#]+$")]
Shape = Annotated[tuple[Annotated[int, Field(ge=0)], ...], Field(max_length=8)]
Tag = Annotated[str, Field(min_length=2, max_length=64, pattern=r"^#[A-Za-z0-9_.\-]+$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DatasetMeta(_Model):
    """What the grid may know about a dataset: never its values."""

    node: Name
    name: Name
    shape: Shape
    dtype: Annotated[str, Field(max_length=16)]
    columns: Annotated[list[Annotated[str, Field(max_length=128)]], Field(max_length=4096)] = []
    description: Text = ""
    tags: Annotated[list[Tag], Field(max_length=32)] = []
    # declared value bounds, per column (or one pair for every value): public, they make DP possible
    bounds: Annotated[list[tuple[float, float]], Field(max_length=4096)] | None = None


class PointerTicket(_Model):
    """A reference to a result kept at its node: the value stays there."""

    node: Name
    object_id: Annotated[str, Field(max_length=80)]
    job_id: Annotated[str, Field(max_length=80)]
    shape: Shape
    dtype: Annotated[str, Field(max_length=16)]
    sources: Annotated[list[Name], Field(max_length=16)]


# --- releases: which door of the release policy a job asks to leave by ----------------

class KeepRelease(_Model):
    """Release nothing: keep the result at the node and answer with a pointer ticket."""

    door: Literal["keep"] = "keep"


class RawRelease(_Model):
    """Release the exact value, sealed to the requester (allowed users, approved jobs)."""

    door: Literal["raw"] = "raw"


class DPRelease(_Model):
    """Release with differential privacy, charged to the requester's budget: Laplace for a
    pure ε, Gaussian (accounted in zCDP) when a δ is given."""

    door: Literal["dp"] = "dp"
    epsilon: Annotated[float, Field(gt=0, le=100)]
    delta: Annotated[float, Field(ge=0, lt=1)] = 0.0


Release = Annotated[KeepRelease | RawRelease | DPRelease, Field(discriminator="door")]


class NoiseInfo(_Model):
    """How a DP release was made: the released value says so."""

    mechanism: Literal["laplace", "gaussian"]
    epsilon: float
    delta: float
    scale: float  # of the noise on the plan's aggregates (sum, mean, count over rows)
    sensitivity: float  # theirs, jointly: L1 for Laplace, L2 for Gaussian
    post_processed: bool = False  # steps after the aggregates ran on their noisy values


class BudgetInfo(_Model):
    """A user's privacy budget on one dataset: the total, and what is spent of it."""

    node: Name
    dataset: Name
    user: Name
    epsilon: float
    delta: float
    spent_epsilon: float
    spent_delta: float
    releases: int

    @property
    def remaining_epsilon(self) -> float:
        return max(0.0, self.epsilon - self.spent_epsilon)


# --- bodies -----------------------------------------------------------------------------

class RunJob(_Model):
    """Data scientist → node: run this plan on local data."""

    kind: Literal["run"] = "run"
    plan: Plan
    release: Release = KeepRelease()


class TrainConfig(_Model):
    """How a node trains a model on its data: everything by name or number, nothing as code."""

    epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 32
    lr: Annotated[float, Field(gt=0, le=10)] = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    proximal_mu: Annotated[float, Field(ge=0, le=100)] = 0.0  # FedProx: pull towards the weights sent
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0


class DPConfig(_Model):
    """DP-SGD: each sample's gradient clipped to ``max_grad_norm``, Gaussian noise of
    ``noise_multiplier`` × that norm added to each batch's sum, batches drawn by Poisson
    sampling; the node's accountant turns it into the (ε, δ) charged to your budget. Its
    privacy unit is a stored row: x and y must each be one row per stored row of one
    dataset, the same rows, each once (no ``cat`` of rows, no shifted slices)."""

    noise_multiplier: Annotated[float, Field(gt=0, le=100)]
    max_grad_norm: Annotated[float, Field(gt=0, le=1000)]
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-6
    # the loss and accuracy on the training rows are released only with noise: Laplace at this ε,
    # added to the training's charge (0: they are withheld from anyone who may not see the rows)
    metrics_epsilon: Annotated[float, Field(ge=0, le=100)] = 0.0
    loss_bound: Annotated[float, Field(gt=0, le=1e6)] = 10.0  # public: each sample's loss is clamped to [0, this]


class SecureAggregation(_Model):
    """Send the trained weights as additive shares, one sealed to each aggregation party of
    the MPC pool, instead of sealed to the requester: only their sum over a round's nodes
    is ever reconstructed. ``round`` names that sum; each party adds a round up once."""

    round: Annotated[str, Field(min_length=16, max_length=64, pattern=r"^[0-9a-f]+$")]
    aggregators: Annotated[list[Name], Field(min_length=2, max_length=8)]
    frac_bits: Annotated[int, Field(ge=8, le=24)] = 16


class TrainMetrics(_Model):
    """What a node reports of a training or evaluation job: on its own data, after training.
    Loss and accuracy are figures of private rows: they leave by a door of the release
    policy as a value would (raw, approved, or with DP noise), else they are withheld —
    ``None``, with the reason in ``withheld`` — and only what is public remains (samples, ε).
    They travel sealed to the requester (:class:`SealedMetrics`), never in plaintext
    through the result backend or Flower."""

    samples: Annotated[int, Field(ge=0)]  # public: the rows' count follows from the plans' shapes
    loss: float | None = None  # None when withheld (see ``withheld``) or not a finite number
    accuracy: float | None = None
    seconds: Annotated[float, Field(ge=0)] = 0.0
    epsilon: float | None = None  # DP: the ε charged for this job, at its δ
    # why loss and accuracy did not leave, and the way out: printable ASCII, no quote or backslash,
    # so that the figures as JSON stay within the padded length whatever the reason says
    withheld: Annotated[str, Field(max_length=240, pattern=r"^[ !#-\[\]-~]*$")] = ""

    def sealed_to(self, recipient: PublicIdentity) -> SealedMetrics:
        """These figures as JSON, padded to one length (the ciphertext's size tells nothing of
        them), sealed to ``recipient`` (X25519 sealed box)."""
        text = self.model_dump_json().ljust(_METRICS_PADDED).encode()
        return SealedMetrics(sealed=base64.b64encode(recipient.seal(text)).decode("ascii"))


_METRICS_PADDED = 512  # a TrainMetrics as JSON is at most ~400 ASCII characters: padded with spaces to this


class SealedMetrics(_Model):
    """:class:`TrainMetrics` sealed to the requester (base64 of an X25519 sealed box): whoever
    reads Redis or Flower sees ciphertext; ``open`` with the requester's key gives the figures."""

    sealed: Annotated[str, Field(min_length=4, max_length=1024, pattern=r"^[A-Za-z0-9+/]+={0,2}$")]

    def open(self, identity: Identity, job_id: str | None = None) -> TrainMetrics:
        """The figures; ``BadSignature`` if they were not sealed to ``identity``, and
        ``InvalidRequest`` if what is sealed is not metrics."""
        try:
            data = base64.b64decode(self.sealed, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("sealed metrics are not valid base64", job_id=job_id) from None
        plain = identity.unseal(data)
        try:
            return TrainMetrics.model_validate_json(plain)
        except ValidationError as exc:
            raise InvalidRequest(f"malformed sealed metrics: {first_problem(exc, 'metrics')}", job_id=job_id) from None


class TrainJob(_Model):
    """Data scientist → node: train this model (a graph of allow-listed layers) on the
    values of plans ``x`` and ``y``, starting from the weights sent (sealed to the node) or
    from trained weights kept there; keep the result at the node or release it."""

    kind: Literal["train"] = "train"
    model: ModelSpec
    weights: SealedValue | None = None
    start: Annotated[str, Field(max_length=80)] | None = None  # a kept object of trained weights
    x: Plan
    y: Plan
    config: TrainConfig = TrainConfig()
    release: Annotated[KeepRelease | RawRelease, Field(discriminator="door")] = KeepRelease()
    dp: DPConfig | None = None  # with DP-SGD, released weights leave by the DP door
    secure: SecureAggregation | None = None


class EvalJob(_Model):
    """Data scientist → node: how do these weights do on the values of plans ``x`` and
    ``y``? The loss (and, for classification, the accuracy) comes back as ``metrics``,
    sealed to the requester and released as trained weights would be: to an allowed user
    of the data, or once the owner approves (kind ``train``) — or, with a ``DPRelease``,
    with noise, charged to the budget: the mean of each sample's loss clamped to
    [0, ``loss_bound``] and the share of hits."""

    kind: Literal["evaluate"] = "evaluate"
    model: ModelSpec
    weights: SealedValue
    x: Plan
    y: Plan
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    release: Annotated[RawRelease | DPRelease, Field(discriminator="door")] = RawRelease()
    loss_bound: Annotated[float, Field(gt=0, le=1e6)] = 10.0  # public, for a DP release


class SealedValue(_Model):
    """A released tensor, sealed to the requester: inline, or by claim-check key in Redis.

    A sealed box says nothing of who sealed it, and whoever learns a claim-check key could
    put other bytes, sealed to the same reader, under it: so the signed message carries the
    bytes' SHA-256, and :meth:`checked` refuses anything else."""

    sealed: Annotated[str, Field(max_length=512 * 1024)] | None = None
    claim_check: Annotated[str, Field(max_length=128)] | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    size: int = 0

    @classmethod
    def left(cls, key: str, data: bytes) -> SealedValue:
        """A value left by claim-check under ``key``, with the digest of its bytes."""
        return cls(claim_check=key, sha256=hashlib.sha256(data).hexdigest(), size=len(data))

    def checked(self, data: bytes) -> bytes:
        """The bytes taken from the claim-check, if they are the ones this message named."""
        if self.sha256 is None or hashlib.sha256(data).hexdigest() != self.sha256:
            raise BadSignature(f"the value under {self.claim_check!r} is not the one the signed message names "
                               "(replaced in the broker?); refused")
        return data


class WireError(_Model):
    code: Annotated[str, Field(max_length=64)]
    message: Text
    job_id: Annotated[str, Field(max_length=80)] | None = None


class BudgetQuery(_Model):
    """Data scientist → node: what is left of my budget (on one dataset, or on all)?"""

    kind: Literal["budget"] = "budget"
    dataset: Name | None = None


class AccessRequest(_Model):
    """Data scientist → node: please make me an allowed user of this dataset (always
    waits for the owner's decision)."""

    kind: Literal["access"] = "access"
    dataset: Name
    reason: Annotated[str, Field(min_length=1, max_length=2000)]


class MockRequest(_Model):
    """Data scientist → node: the dataset's mock twin — synthetic rows with its schema, to try
    plans on locally before spending budget or waiting for approval."""

    kind: Literal["mock"] = "mock"
    dataset: Name


class JobKind(StrEnum):
    """What a job does with the data, as the release policy and the approval queue name it."""

    COMPUTE = "compute"  # its result is kept at the node: a pointer ticket comes back
    RAW_IF_ALLOWED = "raw_if_allowed"  # the exact value, to an allowed user of every input
    DP = "dp"  # a differentially private release, charged to the budget
    TRAIN = "train"  # trained weights, to a user who may not see the data raw
    RAW = "raw"  # the exact value, to anyone else: only with the owner's approval
    ACCESS = "access"  # a request to become an allowed user of a dataset


class RequestStatus(StrEnum):
    """Where a request stands in a node's approval queue."""

    PENDING = "pending"  # waiting for the owner
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"  # closed past [approval] expire_after, undecided: it never runs
    CANCELLED = "cancelled"  # withdrawn by its requester: it never runs


class JobStatus(StrEnum):
    """How a job ended, as its reply says (or that it waits for the owner)."""

    DONE = "done"
    FAILED = "failed"
    DENIED = "denied"
    PENDING_APPROVAL = "pending_approval"


JobId = Annotated[str, Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.\-:]+$")]


class MyRequests(_Model):
    """Data scientist → node: my own requests in your approval queue (of one status, or all)."""

    kind: Literal["requests"] = "requests"
    status: RequestStatus | None = None


class CancelRequest(_Model):
    """Data scientist → node: withdraw my pending request ``request`` (its job id) from your
    approval queue: it never runs, and its ticket ends with ``JobCancelled``. Another user's
    request is refused (``PermissionDenied``)."""

    kind: Literal["cancel"] = "cancel"
    request: JobId


class RequestInfo(_Model):
    """One of the requester's own requests in a node's approval queue, as they may see it."""

    id: JobId
    kind: JobKind
    datasets: Annotated[list[Name], Field(max_length=64)]
    release: Annotated[str, Field(max_length=512)]
    status: RequestStatus
    created_at: float
    decided_at: float | None = None
    expires_at: float | None = None  # a pending request's deadline ([approval] expire_after); None: none
    decision: Text = ""  # the owner's reason for a denial, or how it closed


class JobReply(_Model):
    """Node → data scientist: how the job ended."""

    kind: Literal["job_reply"] = "job_reply"
    status: JobStatus
    ticket: PointerTicket | None = None
    value: SealedValue | None = None
    noise: NoiseInfo | None = None
    budgets: Annotated[list[BudgetInfo], Field(max_length=1024)] = []
    metrics: SealedMetrics | None = None  # a training's or an evaluation's figures, sealed to the requester
    # secure aggregation: aggregation party → claim-check key of the share sealed to it
    shares: Annotated[dict[Name, Annotated[str, Field(max_length=80, pattern=r"^gridq:blob:[A-Za-z0-9_\-]{16,64}$")]],
                      Field(max_length=8)] = {}
    requests: Annotated[list[RequestInfo], Field(max_length=1000)] = []  # MyRequests, CancelRequest
    error: WireError | None = None

    @model_serializer(mode="wrap")
    def _without_empty_requests(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``requests`` only in the replies that list some: a client older than the field
        (``extra="forbid"``) still reads every other reply."""
        fields: dict[str, Any] = handler(self)
        if not fields.get("requests"):
            fields.pop("requests", None)
        return fields


class RegisterNode(_Model):
    """Node → gateway: here I am, with my public key and my datasets' metadata."""

    kind: Literal["register"] = "register"
    public_key: Annotated[str, Field(max_length=256)]
    datasets: Annotated[list[DatasetMeta], Field(max_length=1024)] = []


class PublishDataset(_Model):
    kind: Literal["publish"] = "publish"
    dataset: DatasetMeta


class UnpublishDataset(_Model):
    kind: Literal["unpublish"] = "unpublish"
    name: Name


class NodeInfo(_Model):
    node: Name
    public_key: Annotated[str, Field(max_length=256)]
    queue: Annotated[str, Field(max_length=160)]
    last_seen: float


class GatewayReply(_Model):
    """Gateway → anyone: the answer to a registration, a search or a listing."""

    kind: Literal["gateway_reply"] = "gateway_reply"
    datasets: Annotated[list[DatasetMeta], Field(max_length=100_000)] = []
    nodes: Annotated[list[NodeInfo], Field(max_length=10_000)] = []
    error: WireError | None = None


Body = Annotated[
    RunJob | TrainJob | EvalJob | BudgetQuery | AccessRequest | MockRequest | MyRequests | CancelRequest
    | JobReply | RegisterNode | PublishDataset | UnpublishDataset | GatewayReply,
    Field(discriminator="kind"),
]
_BODY = TypeAdapter(Body)


class SearchQuery(_Model):
    """Anyone → gateway: find datasets carrying all ``tags`` and all ``words``."""

    tags: Annotated[list[Tag], Field(max_length=16)] = []
    words: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=16)] = []
    node: Name | None = None


M = TypeVar("M", bound=BaseModel)


def first_problem(exc: ValidationError, whole: str) -> str:
    """``field.path: what is wrong`` of a validation's first error (``whole`` if it is the
    value itself)."""
    first = exc.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc']) or whole}: {first['msg']}"


def checked(cls: type[M], **fields: Any) -> M:
    """``cls(**fields)`` for a value a person typed: a mistake is an InvalidRequest naming the
    field, what was given and what is expected — not a pydantic traceback."""
    try:
        return cls(**fields)
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:3]:
            where = ".".join(str(p) for p in error["loc"])
            problems.append(f"{where} = {error.get('input')!r}: {error['msg']}")
        hint = ""
        if any(e["type"] == "string_pattern_mismatch" and "tags" in e["loc"] for e in exc.errors()):
            hint = " (tags start with '#', e.g. '#birth-records')"
        raise InvalidRequest(f"{cls.__name__}: " + "; ".join(problems) + hint) from None


def parse_body(data: object, job_id: str | None = None) -> Body:
    """Parse a verified envelope's body into its message type, or raise InvalidRequest."""
    try:
        return _BODY.validate_python(data)
    except ValidationError as exc:
        raise InvalidRequest(f"malformed message: {first_problem(exc, 'body')}", job_id=job_id) from None
