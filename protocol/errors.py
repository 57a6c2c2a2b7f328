"""The typed error hierarchy of gridq, with stable wire codes.

Every error a user can meet is a :class:`GridError`. Errors cross the broker as data
(``{"code", "message", "job_id"}``), never as pickled exceptions; the receiving side turns
the code back into the matching type with :func:`error_from_wire`.

    GridError
    ├── AuthenticationError            the message could not be trusted
    │   ├── BadSignature
    │   ├── UnknownSender
    │   │   └── NotEnrolled            a node the gateway's operator has not enrolled (or with another key)
    │   ├── MessageExpired
    │   ├── ReplayedNonce
    │   ├── StaleMessage               older than a message the gateway already accepted about the same thing
    │   ├── WrongRecipient
    │   ├── MisdirectedReply           a signed reply, but to another job than the one asked about
    │   ├── GatewayKeyChanged          the broker posts another gateway key than the one pinned on first contact
    │   └── IncompatibleProtocol
    ├── PermissionDenied               trusted sender, but no door of the release policy opens
    │   └── RequestDenied              the owner denied this request (with a reason)
    │       └── RequestExpired         no decision within the node's [approval] expire_after: send it again
    ├── ApprovalRequired               the owner must approve this job first (ticket parked)
    ├── BudgetExhausted                the privacy budget does not cover the request
    ├── InvalidRequest                 malformed or oversized input
    │   ├── ForbiddenOperation         a plan names something not on the allow-list
    │   ├── SensitivityUnknown         a DP release of a plan whose sensitivity has no bound
    │   └── LimitExceeded              an element-count, size or length cap
    ├── NotFound                       no such node, dataset, object or job
    ├── NodeUnavailable                the node did not answer in time (retryable)
    ├── CannotCancel                   ticket.cancel() of a job that has started or finished
    └── JobFailed                      the job was valid but failed while running
        └── JobCancelled               its requester cancelled it before it started: it never ran

Retry is a property of the type: only ``retryable`` errors are worth sending again.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GridError(Exception):
    """Root of every gridq error. ``code`` is stable on the wire; ``message`` is for people."""

    code: ClassVar[str] = "grid_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.job_id = job_id

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "job_id": self.job_id}

    def __str__(self) -> str:
        return self.message if self.job_id is None else f"{self.message} (job {self.job_id})"


class AuthenticationError(GridError):
    code = "authentication"


class BadSignature(AuthenticationError):
    code = "bad_signature"


class UnknownSender(AuthenticationError):
    code = "unknown_sender"


class NotEnrolled(UnknownSender):
    """Only nodes the operator enrolled (id and public key) may register or publish."""

    code = "not_enrolled"


class MessageExpired(AuthenticationError):
    code = "expired"


class ReplayedNonce(AuthenticationError):
    code = "replayed_nonce"


class StaleMessage(AuthenticationError):
    """A signed, unreplayed message that is older than one already accepted about the same
    thing: a delayed or withheld publication must not undo a newer withdrawal."""

    code = "stale_message"


class WrongRecipient(AuthenticationError):
    code = "wrong_recipient"


class MisdirectedReply(AuthenticationError):
    code = "misdirected_reply"


class GatewayKeyChanged(AuthenticationError):
    """The gateway key posted on a broker is not the one pinned on first contact (as ssh's
    known_hosts): whoever can write that Redis key could otherwise answer as the gateway."""

    code = "gateway_key_changed"


class IncompatibleProtocol(AuthenticationError):
    code = "incompatible_protocol"


class PermissionDenied(GridError):
    code = "permission_denied"


class RequestDenied(PermissionDenied):
    code = "request_denied"


class RequestExpired(RequestDenied):
    """A request waited in the owner's approval queue longer than the node's ``[approval]
    expire_after`` without a decision: it is closed, and never runs. Send the work again (a
    new job), or ask the owner to decide sooner."""

    code = "request_expired"


class ApprovalRequired(GridError):
    code = "approval_required"


class BudgetExhausted(GridError):
    code = "budget_exhausted"


class InvalidRequest(GridError):
    code = "invalid_request"


class ForbiddenOperation(InvalidRequest):
    code = "forbidden_operation"


class SensitivityUnknown(InvalidRequest):
    code = "sensitivity_unknown"


class LimitExceeded(InvalidRequest):
    code = "limit_exceeded"


class NotFound(GridError):
    code = "not_found"


class NodeUnavailable(GridError):
    code = "node_unavailable"
    retryable = True


class BrokerUnavailable(NodeUnavailable):
    """The client could not talk to Redis (down, unreachable, refused credentials)."""

    code = "broker_unavailable"


class JobFailed(GridError):
    code = "job_failed"


class JobCancelled(JobFailed):
    """Its requester cancelled the job (``ticket.cancel()``) before its node started it: it
    never ran, and nothing of it was charged or kept."""

    code = "job_cancelled"


class CannotCancel(GridError):
    """``ticket.cancel()`` came too late: the node has started the job (a running job is not
    stopped) or has answered it. The message says which, and what to do instead."""

    code = "cannot_cancel"


def _all_subclasses(cls: type[GridError]) -> list[type[GridError]]:
    out: list[type[GridError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


ERRORS_BY_CODE: dict[str, type[GridError]] = {c.code: c for c in _all_subclasses(GridError)}


def error_from_wire(data: dict[str, Any]) -> GridError:
    """Rebuild the typed error from its wire form; an unknown code becomes a plain GridError."""
    cls = ERRORS_BY_CODE.get(str(data.get("code")), GridError)
    return cls(str(data.get("message", "")), job_id=data.get("job_id"))
