"""What travels on the wire, as data: each top-level message type, who sends it to whom, on
which task and queue, and how it is carried. The generator (:mod:`protocol.schema.generate`)
writes one JSON Schema per entry and the index from this list.

The list is written by hand because the direction, task and queue of a message are facts of
the workers' routing, not of the pydantic models; the unit tests check that every kind of
the :data:`~protocol.messages.Body` union and every MPC message has an entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field

from protocol.contract import (
    GATEWAY_NODES_KEY,
    GATEWAY_QUEUE,
    MPC_MODELS_KEY,
    Tasks,
    mpc_ack_key,
    mpc_query_key,
    mpc_queue_for,
    mpc_session_key,
    node_queue,
)
from protocol.envelope import Envelope
from protocol.listing import NodeListing
from protocol.listing import _Posted as PostedNodeListing  # the listing's outer form, as posted in Redis
from protocol.messages import (
    AccessRequest,
    Body,
    BudgetQuery,
    CancelRequest,
    EvalJob,
    GatewayReply,
    JobReply,
    MockRequest,
    MyRequests,
    PublishDataset,
    RegisterNode,
    RunJob,
    SealedMetrics,
    SealedValue,
    SearchQuery,
    TrainJob,
    TrainMetrics,
    UnpublishDataset,
    WireError,
)
from protocol.model_spec import ModelSpec
from protocol.mpc.cards import ModelCard, Query, SignedCard, SignedQuery
from protocol.mpc.wire import Aggregate, Deal, MpcReply, QueryModel, RunSession, ServeModel, StoreShares, UserKeys
from protocol.plan import Plan

# the MPC bodies as one union on ``kind``, as :data:`~protocol.messages.Body` is for the rest: the
# workers route them by the envelope's kind (``workers.mpc.worker``), so protocol has no such union
MpcBody = Annotated[
    ServeModel | StoreShares | UserKeys | QueryModel | RunSession | Deal | Aggregate | MpcReply,
    Field(discriminator="kind"),
]

# placeholders in queue names: filled with the receiving node's id
NODE = "{node}"
SCIENTIST, NODE_ROLE, GATEWAY_ROLE, ANYONE = "data scientist", "node", "gateway", "anyone"
IN_ENVELOPE = "the body of a signed Envelope"
ENVELOPE_REPLY = "the body of a signed Envelope, returned as the task's result"


@dataclass(frozen=True)
class WireType:
    """One top-level type of the wire and the facts about it the models cannot say."""

    name: str  # the file's stem: ``<name>.json``
    type: Any  # a pydantic model, or an annotated union
    carried: str  # how it travels
    sender: str = ""
    recipient: str = ""
    task: str | None = None  # the Celery task name it is sent as
    queue: str | None = None  # the queue that task goes to
    reply: str | None = None  # the name of the answer's type


def _node_job(name: str, model: Any) -> WireType:
    return WireType(name, model, IN_ENVELOPE, SCIENTIST, NODE_ROLE, Tasks.RUN_JOB, node_queue(NODE), "JobReply")


def _to_gateway(name: str, model: Any, task: str) -> WireType:
    return WireType(name, model, IN_ENVELOPE, NODE_ROLE, GATEWAY_ROLE, task, GATEWAY_QUEUE, "GatewayReply")


def _mpc(name: str, model: Any, sender: str, recipient: str, task: str) -> WireType:
    return WireType(name, model, IN_ENVELOPE, sender, recipient, task, mpc_queue_for(NODE, task), "MpcReply")


MESSAGES: tuple[WireType, ...] = (
    WireType("Envelope", Envelope, "every task's one argument (except the gateway's search and nodes) and every "
             "task's result: the signed wrapper of a body", ANYONE, ANYONE),
    # the bodies a node's or the gateway's envelope may carry, one union on ``kind``
    WireType("Body", Body, "the union of the bodies of node and gateway envelopes, on `kind`"),
    _node_job("RunJob", RunJob),
    _node_job("TrainJob", TrainJob),
    _node_job("EvalJob", EvalJob),
    _node_job("BudgetQuery", BudgetQuery),
    _node_job("AccessRequest", AccessRequest),
    _node_job("MockRequest", MockRequest),
    _node_job("MyRequests", MyRequests),
    _node_job("CancelRequest", CancelRequest),
    WireType("JobReply", JobReply, ENVELOPE_REPLY, NODE_ROLE, SCIENTIST),
    _to_gateway("RegisterNode", RegisterNode, Tasks.REGISTER),
    _to_gateway("PublishDataset", PublishDataset, Tasks.PUBLISH),
    _to_gateway("UnpublishDataset", UnpublishDataset, Tasks.UNPUBLISH),
    WireType("SearchQuery", SearchQuery, "the task's one argument, unsigned (a search is public)", ANYONE,
             GATEWAY_ROLE, Tasks.SEARCH, GATEWAY_QUEUE, "GatewayReply"),
    WireType("GatewayReply", GatewayReply, ENVELOPE_REPLY + " (recipient `public`)", GATEWAY_ROLE, ANYONE),
    # the MPC pool
    WireType("MpcBody", MpcBody, "the union of the bodies of MPC envelopes, on `kind`"),
    _mpc("ServeModel", ServeModel, "model owner", "MPC host", Tasks.MPC_SERVE),
    _mpc("UserKeys", UserKeys, "model owner", "MPC host", Tasks.MPC_KEYS),
    WireType("QueryModel", QueryModel, IN_ENVELOPE + "; sent as the task, or pushed (RPUSH, its envelope's JSON) on "
             "the host's list " + mpc_query_key(NODE) + ", whose answer is stored as the task's would be", "querier",
             "MPC host", Tasks.MPC_QUERY, mpc_queue_for(NODE, Tasks.MPC_QUERY), "MpcReply"),
    _mpc("Aggregate", Aggregate, SCIENTIST, "aggregation party", Tasks.MPC_AGGREGATE),
    _mpc("StoreShares", StoreShares, "MPC host", "MPC party", Tasks.MPC_STORE),
    WireType("RunSession", RunSession, "the body of a signed Envelope, pushed (not a task) on the party's list "
             + mpc_session_key(NODE), "MPC host", "MPC party", None, mpc_session_key(NODE), "MpcReply"),
    _mpc("Deal", Deal, "MPC host", "crypto provider", Tasks.MPC_DEAL),
    WireType("MpcReply", MpcReply, ENVELOPE_REPLY + " (a party's answer to its host is pushed on the "
             "list " + mpc_ack_key("{host}", "{party}", "{job_id}") + " instead)", "MPC worker", "its requester"),
    # what is posted in Redis rather than sent
    WireType("PostedNodeListing", PostedNodeListing, f"posted by the gateway at Redis key {GATEWAY_NODES_KEY}; "
             "`listing` is a NodeListing as JSON text, `signature` the gateway's Ed25519 signature (hex)",
             GATEWAY_ROLE, ANYONE),
    WireType("NodeListing", NodeListing, "the JSON text in PostedNodeListing.listing", GATEWAY_ROLE, ANYONE),
    # parts that are signed or sealed on their own inside the messages above
    WireType("Plan", Plan, "inside RunJob, TrainJob and EvalJob: the computation, as allow-listed steps"),
    WireType("ModelSpec", ModelSpec, "inside TrainJob and EvalJob: a model as a graph of allow-listed layers"),
    WireType("SealedValue", SealedValue, "inside JobReply, TrainJob, EvalJob: a tensor sealed to one reader"),
    WireType("SealedMetrics", SealedMetrics, "inside JobReply: TrainMetrics sealed to the requester"),
    WireType("TrainMetrics", TrainMetrics, "the plaintext of SealedMetrics: JSON padded with spaces to 512 bytes"),
    WireType("WireError", WireError, "inside every reply: a typed error as data"),
    WireType("ModelCard", ModelCard, "inside SignedCard: what a model's owner signs"),
    WireType("SignedCard", SignedCard, "inside ServeModel and StoreShares, and posted (countersigned by its "
             "host) in the Redis hash " + MPC_MODELS_KEY),
    WireType("Query", Query, "inside SignedQuery: what a querier signs"),
    WireType("SignedQuery", SignedQuery, "inside QueryModel and RunSession"),
)
