"""What the edge checks before anything reaches the broker, with no I/O but reading public
keys: a job request's form and task, the envelope (``protocol.envelope.verify_envelope``: a
known sender, its signature, not expired, not from the future), the queue it goes to, sizes,
and rates per identity (token buckets).

    keyring = Keyring(Path("~/.gridq/keys").expanduser())     # NAME.pub files, nothing else
    task, raw = parse_job_request(body)
    env = verify(raw, keyring, now=time.time())               # AuthenticationError / InvalidRequest
    queue = queue_for(task, env.recipient)                   # node.<id> or mpc.<id>

Errors are the protocol's (``protocol.errors``); :func:`http_status` gives each its HTTP
status, :func:`error_body` its JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.cancel import cancelled_by, signer
from protocol.contract import CLAIM_CHECK_PREFIX, Tasks, mpc_queue, node_queue
from protocol.envelope import Envelope, verify_envelope
from protocol.errors import (
    AuthenticationError,
    BadSignature,
    GridError,
    InvalidRequest,
    LimitExceeded,
    MessageExpired,
    NodeUnavailable,
    NotFound,
    PermissionDenied,
    ReplayedNonce,
    UnknownSender,
)
from protocol.identity import NAME, PublicIdentity
from protocol.messages import SearchQuery, first_problem

log = logging.getLogger(__name__)

EDGE = "edge"  # what the edge calls itself in the protocol's messages

# the tasks a client may send through the edge, and the queue each goes to at the envelope's recipient
USER_TASKS: dict[str, Callable[[str], str]] = {
    Tasks.RUN_JOB: node_queue,
    Tasks.MPC_QUERY: mpc_queue,
    Tasks.MPC_SERVE: mpc_queue,
    Tasks.MPC_KEYS: mpc_queue,
    Tasks.MPC_AGGREGATE: mpc_queue,
}
KNOWN_TASKS = {v for k, v in vars(Tasks).items() if k.isupper() and isinstance(v, str)}
BLOB_KEY = re.compile(re.escape(CLAIM_CHECK_PREFIX) + r"[A-Za-z0-9_\-]{1,128}")
JOB_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,80}")  # what a worker takes as a task id (protocol/inbox.py), and a URL names
CANCEL_BODY_MAX = 4096  # {"cancellation": "cancel <name> <88 base64 characters>"}: a few hundred bytes


class TooLarge(LimitExceeded):
    """A body over its route's limit (HTTP 413); on the wire, ``limit_exceeded``."""


class TooMany(LimitExceeded):
    """Over a rate or a concurrency limit (HTTP 429, with Retry-After); on the wire, ``limit_exceeded``."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- errors as HTTP ---------------------------------------------------------------------------

def http_status(exc: GridError) -> int:
    """The HTTP status of a refusal: 400 invalid, 401 not authenticated, 403 not allowed, 404
    not found, 409 replayed, 413 too large, 429 too many, 503 unavailable, 500 otherwise."""
    for kind, status in ((TooLarge, 413), (TooMany, 429), (ReplayedNonce, 409), (AuthenticationError, 401),
                         (InvalidRequest, 400), (PermissionDenied, 403), (NotFound, 404), (NodeUnavailable, 503)):
        if isinstance(exc, kind):
            return status
    return 500


def error_body(exc: GridError) -> dict[str, Any]:
    """``{"error": {"code", "message"}}``: the code as on the broker's wire (``GridError.to_wire``)."""
    wire = exc.to_wire()
    return {"error": {"code": wire["code"], "message": wire["message"]}}


# --- what a request says ----------------------------------------------------------------------

class JobRequest(BaseModel):
    """The body of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    task: Annotated[str, Field(max_length=64)]
    envelope: dict[str, Any]


def parse_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: a body nested too deep
        raise InvalidRequest(f"{what} is not JSON: {str(exc)[:200]}") from None


def parse_job_request(body: bytes) -> tuple[str, dict[str, Any]]:
    """The task and the (unverified) envelope of a job request."""
    data = parse_json(body, "the request body")
    try:
        request = JobRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(f'the request body must be {{"task": "<task name>", "envelope": {{…}}}}: '
                             f"{first_problem(exc, 'body')}") from None
    return request.task, request.envelope


class CancelRequest(BaseModel):
    """The body of ``POST /v1/jobs/{id}/cancel``: the sender's signed cancellation of the job
    (``protocol.cancel.cancellation``), exactly as it is to be kept under the job's key."""

    model_config = ConfigDict(extra="forbid", strict=True)

    cancellation: Annotated[str, Field(max_length=256)]


def parse_cancel(body: bytes) -> str:
    """The (unverified) signed cancellation a cancel request carries."""
    try:
        return CancelRequest.model_validate(parse_json(body, "the request body")).cancellation
    except ValidationError as exc:
        raise InvalidRequest('the request body must be {"cancellation": "cancel <name> <signature>"} '
                             f"(protocol/cancel.py): {first_problem(exc, 'body')}") from None


def verify_cancellation(mark: str, keyring: Mapping[str, PublicIdentity], job_id: str) -> str:
    """Who signed ``mark``, a cancellation of ``job_id`` (``protocol.cancel.cancelled_by``
    with the signer's key in ``keyring``): InvalidRequest if it is not one in form,
    UnknownSender for a signer the edge does not admit, BadSignature unless that signer's key
    signed it for this very job."""
    name = signer(mark)
    if not name:
        raise InvalidRequest("not a signed cancellation: it reads 'cancel <name> <base64 signature>' "
                             "(protocol/cancel.py)", job_id=job_id)
    key = keyring.get(name)
    if key is None:
        raise UnknownSender(f"{name!r} is not a user this edge admits: its operator adds the user's public key "
                            "(NAME.pub) to the edge's --users folder", job_id=job_id)
    if not cancelled_by(mark, key, job_id):
        raise BadSignature(f"the cancellation is not {name!r}'s signature of job {job_id}", job_id=job_id)
    return name


def parse_search(body: bytes) -> SearchQuery:
    try:
        return SearchQuery.model_validate(parse_json(body, "the search query"))
    except ValidationError as exc:
        raise InvalidRequest(f"not a search query: {first_problem(exc, 'query')}") from None


def check_task(task: str) -> None:
    """A task a client may send through the edge; PermissionDenied for a gridq task that only
    nodes or the gateway send, InvalidRequest for a name that is no task at all."""
    if task in USER_TASKS:
        return
    allowed = ", ".join(sorted(USER_TASKS))
    if task in KNOWN_TASKS:
        raise PermissionDenied(f"{task} is not sent through the edge (nodes and the gateway send it); the edge "
                               f"relays {allowed}")
    raise InvalidRequest(f"{task[:64]!r} is not a task; the edge relays {allowed}")


def queue_for(task: str, recipient: str) -> str:
    """Where ``task`` for ``recipient`` (an envelope's, so a plain name) goes."""
    check_task(task)
    return USER_TASKS[task](recipient)


def verify(raw: Any, keyring: Mapping[str, PublicIdentity], now: float) -> Envelope:
    """The envelope ``raw``, checked as far as a relay can: form, a sender the edge admits, its
    signature, its expiry and issue time. The nonce is the broker's to remember (``EdgeBroker``)."""
    try:
        return verify_envelope(raw, keyring=keyring, now=now, verifier=EDGE)
    except UnknownSender as exc:
        sender = str(raw.get("sender"))[:64] if isinstance(raw, dict) else "?"
        raise UnknownSender(f"{sender!r} is not a user this edge admits: its operator adds the user's public key "
                            "(NAME.pub) to the edge's --users folder", job_id=exc.job_id) from None


def nonce_ttl(env: Envelope, now: float) -> int:
    """How long (whole seconds) to remember an envelope's nonce: until it expires, after which
    it is refused as expired anyway."""
    if env.expires_at < now:
        raise MessageExpired("message expired; send the job again", job_id=env.job_id)
    return max(1, math.ceil(env.expires_at - now))


def check_job_id(job_id: str) -> str:
    """A job id that ``GET /v1/jobs/{id}`` can name (the edge relays no job it could not)."""
    if not JOB_ID.fullmatch(job_id):
        raise InvalidRequest(f"job id {job_id[:80]!r}: 1 to 80 letters, digits, '_', '.', ':' or '-' (as the "
                             "Python client's '<node>:<32 hex digits>'; a worker takes no other)")
    return job_id


def check_blob_key(key: str) -> str:
    if not BLOB_KEY.fullmatch(key):
        raise InvalidRequest(f"not a claim-check key: they read {CLAIM_CHECK_PREFIX}<letters, digits, '-' or '_'>")
    return key


def check_length(content_length: str | None, limit: int) -> None:
    """Refuse a body whose declared length is over ``limit`` before reading it."""
    if content_length is None:
        return
    try:
        length = int(content_length)
    except ValueError:
        raise InvalidRequest("Content-Length is not a number") from None
    if length > limit:
        raise TooLarge(f"the body is {length} bytes; this route takes at most {limit}")


def wait_seconds(value: str | None, most: float) -> float:
    """``?wait=``: seconds to long-poll, 0 by default, at most ``most``."""
    if value is None or value == "":
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        raise InvalidRequest(f"wait={value[:32]!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidRequest("wait must be a number of seconds ≥ 0")
    return min(seconds, most)


# --- rates ------------------------------------------------------------------------------------

class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; each request takes its cost."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, now

    def take(self, cost: float, now: float) -> float:
        """0 if ``cost`` tokens were taken; else the seconds until they would be there."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if cost <= self.tokens:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


class RateLimiter:
    """One token bucket per key (a sender, a client address), the least recently used
    forgotten beyond ``max_keys`` (a forgotten key starts again with a full bucket)."""

    def __init__(self, rate: float, burst: float, what: str, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.what, self.max_keys, self.clock = rate, burst, what, max_keys, clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, key: str, cost: float = 1.0) -> None:
        """Take ``cost`` from ``key``'s bucket, or raise TooMany saying when to come back."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        if cost > self.burst:
            raise TooLarge(f"{cost:g} is over what {self.what} may ever take at once ({self.burst:g})")
        wait = bucket.take(cost, now)
        if wait > 0:
            raise TooMany(f"too many requests for {self.what} {key[:64]!r} (at most {self.rate:g}/s, bursts of "
                          f"{self.burst:g}); try again in {wait:.2f} s", retry_after=wait)


# --- whom the edge admits ---------------------------------------------------------------------

class Keyring(Mapping[str, PublicIdentity]):
    """The public keys in a folder of ``NAME.pub`` files (``gridq keys new`` writes them), read
    again when a file there is added, changed or removed (looked at most every ``recheck``
    seconds). Only ``.pub`` files are read: the folder may hold secret keys, which the edge
    never opens."""

    def __init__(self, folder: Path, recheck: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.folder, self.recheck, self.clock = Path(folder), recheck, clock
        self._keys: dict[str, PublicIdentity] = {}
        self._seen: tuple[tuple[str, int, int], ...] | None = None
        self._checked = -math.inf
        self._refresh()

    def _files(self) -> tuple[tuple[str, int, int], ...]:
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return ()
        out = []
        for entry in entries:
            if entry.name.endswith(".pub") and NAME.fullmatch(entry.name[:-4]):
                try:
                    status = entry.stat()
                except OSError:
                    continue
                out.append((entry.name, status.st_mtime_ns, status.st_size))
        return tuple(sorted(out))

    def _refresh(self) -> None:
        now = self.clock()
        if now - self._checked < self.recheck:
            return
        self._checked = now
        files = self._files()
        if files == self._seen:
            return
        keys = {}
        for name, _, size in files:
            if size > 4096:
                continue
            try:
                text = (self.folder / name).read_text().strip()
                keys[name[:-4]] = PublicIdentity.parse(name[:-4], text)
            except (OSError, UnicodeDecodeError, GridError) as exc:
                log.warning("skipping %s: not a public key (%s)", self.folder / name, exc)
        self._keys, self._seen = keys, files

    def __getitem__(self, name: str) -> PublicIdentity:
        self._refresh()
        return self._keys[name]

    def __iter__(self) -> Iterator[str]:
        self._refresh()
        return iter(self._keys)

    def __len__(self) -> int:
        self._refresh()
        return len(self._keys)
