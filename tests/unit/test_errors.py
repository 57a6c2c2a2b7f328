"""The typed error hierarchy: wire codes, round trips and retryability."""

from __future__ import annotations

import json

import pytest

from protocol import errors
from protocol.errors import (
    ERRORS_BY_CODE,
    ApprovalRequired,
    AuthenticationError,
    BadSignature,
    BrokerUnavailable,
    BudgetExhausted,
    ForbiddenOperation,
    GatewayKeyChanged,
    GridError,
    IncompatibleProtocol,
    InvalidRequest,
    JobFailed,
    LimitExceeded,
    MessageExpired,
    MisdirectedReply,
    NodeUnavailable,
    NotEnrolled,
    NotFound,
    PermissionDenied,
    ReplayedNonce,
    RequestDenied,
    SensitivityUnknown,
    StaleMessage,
    UnknownSender,
    WrongRecipient,
    error_from_wire,
)

ALL_CLASSES = sorted(ERRORS_BY_CODE.values(), key=lambda c: c.code)


def _every_subclass(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_every_subclass(sub))
    return out


def test_registry_holds_every_documented_error() -> None:
    expected = {
        GridError, AuthenticationError, BadSignature, UnknownSender, MessageExpired,
        ReplayedNonce, WrongRecipient, MisdirectedReply, IncompatibleProtocol, PermissionDenied,
        ApprovalRequired, BudgetExhausted, InvalidRequest, ForbiddenOperation,
        LimitExceeded, SensitivityUnknown, NotFound, NodeUnavailable, BrokerUnavailable, JobFailed,
        RequestDenied, NotEnrolled, StaleMessage, GatewayKeyChanged,
        errors.JobCancelled, errors.CannotCancel,  # ticket.cancel()
        errors.RequestExpired,  # [approval] expire_after
    }
    assert set(ERRORS_BY_CODE.values()) == expected


def test_codes_are_unique() -> None:
    classes = [c for c in _every_subclass(GridError) if c.__module__ == errors.__name__]
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes)), codes
    # the registry would silently drop a duplicate: it must be as long as the class list
    assert len(ERRORS_BY_CODE) == len(classes)
    for code, cls in ERRORS_BY_CODE.items():
        assert cls.code == code


def test_codes_are_short_wire_safe_strings() -> None:
    for code in ERRORS_BY_CODE:
        assert code and len(code) <= 64
        assert code == code.lower()
        assert all(ch.isalnum() or ch == "_" for ch in code), code


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_error_is_a_grid_error(cls: type[GridError]) -> None:
    assert issubclass(cls, GridError)
    assert issubclass(cls, Exception)
    err = cls("boom")
    assert isinstance(err, GridError)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("job_id", [None, "job-42"])
def test_wire_round_trip(cls: type[GridError], job_id: str | None) -> None:
    err = cls(f"something about {cls.__name__}", job_id=job_id)
    wire = err.to_wire()
    assert wire == {"code": cls.code, "message": f"something about {cls.__name__}", "job_id": job_id}
    # the wire form is plain JSON data
    back = error_from_wire(json.loads(json.dumps(wire)))
    assert type(back) is cls
    assert back.message == err.message
    assert back.job_id == job_id
    assert back.code == cls.code
    assert back.retryable == cls.retryable


def test_unknown_code_becomes_plain_grid_error() -> None:
    back = error_from_wire({"code": "no_such_code", "message": "hm", "job_id": "j1"})
    assert type(back) is GridError
    assert back.message == "hm"
    assert back.job_id == "j1"


def test_missing_fields_on_the_wire_do_not_crash() -> None:
    back = error_from_wire({})
    assert type(back) is GridError
    assert back.message == ""
    assert back.job_id is None


def test_retryable_is_a_property_of_the_type() -> None:
    assert NodeUnavailable.retryable is True
    assert NodeUnavailable("later").retryable is True
    assert PermissionDenied.retryable is False
    assert PermissionDenied("no").retryable is False
    # nothing else is retryable: a retry would just fail again
    assert {c for c in ALL_CLASSES if c.retryable} == {NodeUnavailable, BrokerUnavailable}


def test_hierarchy_matches_the_documented_tree() -> None:
    for cls in (BadSignature, UnknownSender, MessageExpired, ReplayedNonce, WrongRecipient,
                IncompatibleProtocol):
        assert issubclass(cls, AuthenticationError)
    for cls in (ForbiddenOperation, LimitExceeded):
        assert issubclass(cls, InvalidRequest)
    for cls in (PermissionDenied, ApprovalRequired, BudgetExhausted, NotFound,
                NodeUnavailable, JobFailed, InvalidRequest):
        assert not issubclass(cls, AuthenticationError)
    assert not issubclass(LimitExceeded, ForbiddenOperation)


def test_str_mentions_the_job_only_when_there_is_one() -> None:
    assert str(NotFound("no such dataset")) == "no such dataset"
    text = str(NotFound("no such dataset", job_id="j-7"))
    assert text.startswith("no such dataset")
    assert "j-7" in text


def test_errors_can_be_raised_and_caught_by_base() -> None:
    with pytest.raises(InvalidRequest) as info:
        raise LimitExceeded("too big", job_id="j")
    assert info.value.code == "limit_exceeded"
    assert info.value.job_id == "j"
