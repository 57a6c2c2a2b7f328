"""What the HTTP edge checks before anything reaches the broker (ops/edge/checks.py, issue
17): envelopes verified as far as a relay can (sender, signature, expiry, clock skew; the
recipient is not the edge's to check), the tasks it relays and their queues, sizes, rates per
identity, and whom it admits (NAME.pub files only). Pure: no broker, no server."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ops.edge.checks import (
    USER_TASKS,
    Keyring,
    RateLimiter,
    TokenBucket,
    TooLarge,
    TooMany,
    check_blob_key,
    check_job_id,
    check_length,
    check_task,
    error_body,
    http_status,
    nonce_ttl,
    parse_cancel,
    parse_job_request,
    parse_search,
    queue_for,
    verify,
    verify_cancellation,
    wait_seconds,
)
from ops.edge.settings import EdgeSettings
from protocol.contract import CLAIM_CHECK_PREFIX, Tasks
from protocol.envelope import CLOCK_SKEW_SECONDS, MAX_TTL_SECONDS, PROTOCOL_VERSION, Envelope, seal_envelope
from protocol.errors import (
    ApprovalRequired,
    BadSignature,
    BrokerUnavailable,
    GridError,
    IncompatibleProtocol,
    InvalidRequest,
    JobFailed,
    LimitExceeded,
    MessageExpired,
    NodeUnavailable,
    NotFound,
    PermissionDenied,
    ReplayedNonce,
    UnknownSender,
    error_from_wire,
)
from protocol.identity import Identity, _b64

NOW = 1_700_000_000.0
ALICE = Identity.generate("alice")
MALLORY = Identity.generate("mallory")
KEYRING = {"alice": ALICE.public}


def envelope(identity: Identity = ALICE, *, recipient: str = "hospital", now: float = NOW, ttl: float = 600.0,
             **changes: Any) -> dict[str, Any]:
    env = seal_envelope(identity, recipient=recipient, kind="run", job_id=f"{recipient}:{'a' * 32}",
                        body={"kind": "run"}, now=now, ttl=ttl).model_dump(mode="json")
    env.update(changes)
    return env


# --- envelopes --------------------------------------------------------------------------------

def test_a_cancellation_passes_only_for_its_job_signed_by_an_admitted_user() -> None:
    """POST /v1/jobs/{id}/cancel: protocol.cancel's mark, verified with the signer's key in the
    edge's keyring (ops/edge/checks.py); who may cancel which job is the broker's to say."""
    from protocol.cancel import STARTED, cancellation

    job = "hospital:" + "a" * 32
    mark = cancellation(ALICE, job).decode()
    assert parse_cancel(json.dumps({"cancellation": mark}).encode()) == mark
    assert verify_cancellation(mark, KEYRING, job) == "alice"
    for body in (b"{}", b'{"cancellation": 7}', b'{"cancellation": "x", "more": 1}', b"[]", b"nope",
                 json.dumps({"cancellation": "x" * 257}).encode()):
        with pytest.raises(InvalidRequest):
            parse_cancel(body)
    with pytest.raises(UnknownSender, match="'mallory' is not a user this edge admits") as unknown:
        verify_cancellation(cancellation(MALLORY, job).decode(), KEYRING, job)
    forged = cancellation(MALLORY, job).decode().replace("cancel mallory ", "cancel alice ")
    for bad in (forged, cancellation(ALICE, "hospital:" + "b" * 32).decode(), "cancel alice !!!", "cancel alice x"):
        with pytest.raises(BadSignature, match=f"not 'alice''s signature of job {job}") as caught:
            verify_cancellation(bad, KEYRING, job)
        assert http_status(caught.value) == 401 == http_status(unknown.value)
    for junk in (STARTED.decode(), "", "cancel alice", f"{mark} x"):
        with pytest.raises(InvalidRequest, match="not a signed cancellation"):
            verify_cancellation(junk, KEYRING, job)


def test_a_signed_envelope_passes_whoever_it_is_for() -> None:
    for recipient in ("hospital", "company", "anyone-else"):  # the recipient checks that it is meant for it
        env = verify(envelope(recipient=recipient), KEYRING, NOW + 1)
        assert isinstance(env, Envelope) and env.sender == "alice" and env.recipient == recipient


def test_unsigned_forged_and_tampered_envelopes_are_bad_signatures() -> None:
    unsigned = envelope(signature="")
    forged = envelope(MALLORY) | {"sender": "alice"}  # mallory signs, claiming to be alice
    tampered = envelope(recipient="hospital") | {"recipient": "clinic"}  # signed for another node
    garbage = envelope(signature="not base64 at all!!")
    other = envelope(signature=_b64(MALLORY.sign(b"something else")))
    for raw in (unsigned, forged, tampered, garbage, other):
        with pytest.raises(BadSignature) as caught:
            verify(raw, KEYRING, NOW)
        assert http_status(caught.value) == 401
        assert caught.value.job_id == "hospital:" + "a" * 32 or raw is tampered


def test_an_unknown_sender_is_told_how_to_be_admitted() -> None:
    with pytest.raises(UnknownSender, match="'mallory' is not a user this edge admits.*NAME.pub.*--users") as caught:
        verify(envelope(MALLORY), KEYRING, NOW)
    assert http_status(caught.value) == 401 and error_body(caught.value)["error"]["code"] == "unknown_sender"


def test_expired_future_and_overlong_envelopes_are_refused() -> None:
    with pytest.raises(MessageExpired):
        verify(envelope(ttl=60), KEYRING, NOW + 61)
    verify(envelope(now=NOW + CLOCK_SKEW_SECONDS - 1), KEYRING, NOW)  # within the clock skew
    with pytest.raises(MessageExpired, match="future"):
        verify(envelope(now=NOW + CLOCK_SKEW_SECONDS + 5), KEYRING, NOW)
    raw = envelope()
    unsigned = Envelope.model_validate(raw | {"expires_at": NOW + MAX_TTL_SECONDS + 10, "signature": ""})
    overlong = unsigned.model_copy(update={"signature": _b64(ALICE.sign(unsigned.signed_bytes()))})
    with pytest.raises(MessageExpired):  # a lifetime over the protocol's maximum is never accepted
        verify(overlong.model_dump(mode="json"), KEYRING, NOW)


def test_malformed_envelopes_are_invalid_requests() -> None:
    good = envelope()
    for raw in ({}, {"sender": "alice"}, good | {"issued_at": "yesterday"}, good | {"extra": 1},
                good | {"sender": "../etc"}, good | {"nonce": "short"}, good | {"body": 5}, [good], "text", None):
        with pytest.raises(InvalidRequest) as caught:
            verify(raw, KEYRING, NOW)
        assert http_status(caught.value) == 400
    with pytest.raises(IncompatibleProtocol):
        verify(good | {"v": "2.0"}, KEYRING, NOW)
    assert PROTOCOL_VERSION.startswith("1.")


def test_nonce_ttl_lasts_until_the_envelope_expires() -> None:
    env = verify(envelope(ttl=600), KEYRING, NOW)
    assert nonce_ttl(env, NOW) == 600 and nonce_ttl(env, NOW + 599.5) == 1
    with pytest.raises(MessageExpired):
        nonce_ttl(env, NOW + 601)


# --- requests, tasks, queues -----------------------------------------------------------------

def test_a_job_request_is_a_task_and_an_envelope() -> None:
    raw = envelope()
    task, env = parse_job_request(json.dumps({"task": Tasks.RUN_JOB, "envelope": raw}).encode())
    assert task == Tasks.RUN_JOB and env == raw
    bad: list[bytes] = [b"", b"{", b"\xff\xfe", b"[]", b"5", b'"text"', b"null",
                        json.dumps({"task": 5, "envelope": raw}).encode(),
                        json.dumps({"task": Tasks.RUN_JOB, "envelope": [raw]}).encode(),
                        json.dumps({"task": Tasks.RUN_JOB}).encode(),
                        json.dumps({"task": Tasks.RUN_JOB, "envelope": raw, "more": 1}).encode(),
                        json.dumps({"task": "x" * 65, "envelope": raw}).encode(),
                        b'{"task": "a", "envelope": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"]  # nested too deep
    for body in bad:
        with pytest.raises(InvalidRequest):
            parse_job_request(body)


def test_the_edge_relays_a_user_s_tasks_to_the_recipient_s_queues_only() -> None:
    assert queue_for(Tasks.RUN_JOB, "hospital") == "node.hospital"
    for task in (Tasks.MPC_QUERY, Tasks.MPC_SERVE, Tasks.MPC_KEYS, Tasks.MPC_AGGREGATE):
        assert queue_for(task, "company") == "mpc.company"
    assert set(USER_TASKS) == {Tasks.RUN_JOB, Tasks.MPC_QUERY, Tasks.MPC_SERVE, Tasks.MPC_KEYS, Tasks.MPC_AGGREGATE}
    for task in (Tasks.MPC_STORE, Tasks.MPC_DEAL, Tasks.REGISTER, Tasks.PUBLISH, Tasks.SEARCH):
        with pytest.raises(PermissionDenied) as denied:  # what nodes and the gateway send
            check_task(task)
        assert http_status(denied.value) == 403
    for task in ("os.system", "", "celery.backend_cleanup", "gridq.node.run_job "):
        with pytest.raises(InvalidRequest) as invalid:
            check_task(task)
        assert http_status(invalid.value) == 400


def test_search_queries_are_checked_before_the_gateway_sees_them() -> None:
    assert parse_search(b'{"tags": ["#digits"], "words": ["clinic"]}').tags == ["#digits"]
    for body in (b"{", b'{"tags": "#digits"}', b'{"tags": [5]}', b'{"nodes": 1}', b'{"tags": ["no hash"]}'):
        with pytest.raises(InvalidRequest):
            parse_search(body)


def test_ids_keys_lengths_and_waits() -> None:
    assert check_job_id("hospital:" + "0" * 32) == "hospital:" + "0" * 32
    for bad in ("", "a b", "x" * 81, "tab\there", "é", "a/b", "a*", "a%2F", "a?b"):
        with pytest.raises(InvalidRequest):
            check_job_id(bad)
    key = f"{CLAIM_CHECK_PREFIX}{'f' * 32}"
    assert check_blob_key(key) == key
    for bad in ("gridq:sent:x", "gridq:gateway:identity", "celery-task-meta-x", f"{CLAIM_CHECK_PREFIX}*",
                f"{CLAIM_CHECK_PREFIX}../x", f"{CLAIM_CHECK_PREFIX}a:b", CLAIM_CHECK_PREFIX, "x" + key):
        with pytest.raises(InvalidRequest):
            check_blob_key(bad)
    check_length(None, 10)
    check_length("10", 10)
    with pytest.raises(TooLarge) as large:
        check_length("11", 10)
    assert http_status(large.value) == 413 and error_body(large.value)["error"]["code"] == "limit_exceeded"
    with pytest.raises(InvalidRequest):
        check_length("ten", 10)
    assert wait_seconds(None, 30) == 0 and wait_seconds("", 30) == 0 and wait_seconds("2.5", 30) == 2.5
    assert wait_seconds("3600", 30) == 30  # at most the edge's limit
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(InvalidRequest):
            wait_seconds(bad, 30)


def test_every_error_has_its_status_and_its_wire_code() -> None:
    cases: list[tuple[GridError, int]] = [
        (InvalidRequest("x"), 400), (LimitExceeded("x"), 400), (BadSignature("x"), 401), (UnknownSender("x"), 401),
        (MessageExpired("x"), 401), (IncompatibleProtocol("x"), 401), (PermissionDenied("x"), 403),
        (NotFound("x"), 404), (ReplayedNonce("x"), 409), (TooLarge("x"), 413), (TooMany("x"), 429),
        (NodeUnavailable("x"), 503), (BrokerUnavailable("x"), 503), (JobFailed("x"), 500),
        (ApprovalRequired("x"), 500)]
    for error, status in cases:
        assert http_status(error) == status, error
        body = error_body(error)
        assert body == {"error": {"code": error.code, "message": "x"}}
        assert type(error_from_wire(body["error"])) is (LimitExceeded if isinstance(error, LimitExceeded)
                                                         else type(error))


# --- rates ------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_token_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.take(1, 0.0) for _ in range(3)] == [0, 0, 0]
    assert bucket.take(1, 0.0) == pytest.approx(0.1)
    assert bucket.take(1, 0.1) == 0  # one more token after 1/rate seconds
    assert bucket.take(1, 10.0) == 0 and bucket.tokens == 2  # never more than the burst saved up


def test_rates_are_per_identity_and_say_when_to_come_back() -> None:
    clock = Clock()
    limits = RateLimiter(rate=50, burst=100, what="sender", clock=clock)
    for _ in range(100):
        limits.check("alice")
    with pytest.raises(TooMany, match="sender 'alice'") as caught:
        limits.check("alice")
    assert http_status(caught.value) == 429 and 0 < caught.value.retry_after <= 0.02 + 1e-9
    limits.check("bob")  # another identity has its own bucket
    clock.now = 1.0
    for _ in range(50):
        limits.check("alice")
    with pytest.raises(TooMany):
        limits.check("alice")
    with pytest.raises(TooLarge):  # more than a bucket ever holds: never, however long one waits
        limits.check("carol", cost=101)


def test_buckets_are_bounded_in_number() -> None:
    limits = RateLimiter(rate=1, burst=1, what="client", max_keys=3, clock=Clock())
    for ip in ("a", "b", "c", "d"):
        limits.check(ip)
    assert len(limits) == 3
    limits.check("a")  # forgotten, so full again
    with pytest.raises(TooMany):
        limits.check("d")


# --- whom the edge admits ---------------------------------------------------------------------

def test_the_keyring_reads_public_key_files_only_and_follows_the_folder(tmp_path: Path) -> None:
    from ops.keys import write_identity

    alice = write_identity(tmp_path, "alice")
    write_identity(tmp_path, "carol")
    (tmp_path / "carol.pub").unlink()  # carol.key alone: a secret key file, which the edge never reads
    (tmp_path / "broken.pub").write_text("not a key\n")
    (tmp_path / "huge.pub").write_text("gridq1:" + "A" * 10_000)
    (tmp_path / "bad name!.pub").write_text(alice.public.text())
    os.mkfifo(tmp_path / "fifo.key")  # reading it would block for ever
    clock = Clock()
    keyring = Keyring(tmp_path, recheck=2.0, clock=clock)
    assert dict(keyring) == {"alice": alice.public}
    zoe = write_identity(tmp_path, "zoe")
    assert "zoe" not in keyring  # looked again only after `recheck` seconds …
    clock.now = 2.0
    assert keyring["zoe"] == zoe.public  # … then a new user is admitted without a restart
    (tmp_path / "alice.pub").unlink()
    clock.now = 4.0
    assert "alice" not in keyring and len(keyring) == 1
    with pytest.raises(UnknownSender):
        verify(envelope(), keyring, NOW)
    assert Keyring(tmp_path / "missing").get("alice") is None


def test_settings_refuse_limits_that_cannot_work(tmp_path: Path) -> None:
    EdgeSettings(broker="redis://x", users=tmp_path)
    for bad in ({"job_body_max": 0}, {"job_rate": 0.0}, {"max_wait": -1.0}, {"ip_burst": math.nan}):
        with pytest.raises(InvalidRequest):
            EdgeSettings(broker="redis://x", users=tmp_path, **bad)  # type: ignore[arg-type]


def test_the_edge_does_not_load_torch() -> None:
    code = ("import sys\nimport ops.edge.app, ops.edge.run, ops.edge.client\n"
            "print(','.join(m for m in ('torch', 'numpy', 'opacus', 'opendp') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
