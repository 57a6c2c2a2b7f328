"""Cancelling a job before its node starts it (``ticket.cancel()``).

One Redis key per job (:func:`protocol.contract.cancel_key`) says who took the job up
first. The node sets it with ``SET NX`` to :data:`STARTED` when it takes the job up, before
it authorizes or runs anything; the requester's ``ticket.cancel()`` sets it with ``SET NX``
too, to its signed :func:`cancellation` of that job. Exactly one of them wins:

* the requester: when the node takes the job up it finds the cancellation, checks that the
  job's own sender signed it for this job, and answers ``JobCancelled`` (signed, as any
  answer) without running anything — no plan read, nothing charged or kept;
* the node: ``cancel()`` finds the job started and raises ``CannotCancel`` (a running job is
  not stopped halfway).

Not Celery's ``revoke``: that is a broadcast on the workers' remote-control channel, which
no scientist's broker user may publish on (ops/acl.py: it also carries ``shutdown``), it is
unsigned (anyone could revoke anyone's job) and each worker keeps it in memory only.

What one broker user shared by every scientist allows: whoever knows a job's id may write
its key first. A cancellation not signed by the job's sender is ignored by the node (the job
runs), but it — or a forged ``started`` — keeps the job's requester from cancelling it. Job
ids are random and never listed to scientists (no KEYS, no SCAN).
"""

from __future__ import annotations

import base64
import binascii

from protocol.envelope import CLOCK_SKEW_SECONDS, MAX_TTL_SECONDS
from protocol.errors import BadSignature
from protocol.identity import Identity, PublicIdentity

STARTED = b"started"
# a cancellation waits as long as the job's envelope could still be run (then the node refuses it anyway)
CANCEL_TTL_SECONDS = int(MAX_TTL_SECONDS + CLOCK_SKEW_SECONDS)
_PREFIX = b"cancel"


def _statement(job_id: str) -> bytes:
    """What a cancellation signs: domain-separated, so no other signature can pass for one."""
    return b"gridq cancel v1\x00" + job_id.encode()


def cancellation(identity: Identity, job_id: str) -> bytes:
    """``identity``'s signed cancellation of ``job_id``, as it is kept under the job's key."""
    signature = base64.b64encode(identity.sign(_statement(job_id)))
    return b" ".join((_PREFIX, identity.name.encode(), signature))


def cancelled_by(mark: bytes | str | None, key: PublicIdentity, job_id: str) -> bool:
    """Whether ``mark`` (what a job's key holds) is ``key``'s signed cancellation of ``job_id``."""
    if isinstance(mark, str):
        mark = mark.encode()
    parts = (mark or b"").split(b" ")
    if len(parts) != 3 or parts[0] != _PREFIX or parts[1] != key.name.encode():
        return False
    try:
        key.verify(_statement(job_id), base64.b64decode(parts[2], validate=True))
    except (BadSignature, binascii.Error, ValueError):
        return False
    return True


def signer(mark: bytes | str | None) -> str:
    """Who a cancellation says it is from ('' if ``mark`` is not one): for messages only."""
    if isinstance(mark, str):
        mark = mark.encode()
    parts = (mark or b"").split(b" ")
    return parts[1].decode("utf-8", "replace")[:64] if len(parts) == 3 and parts[0] == _PREFIX else ""
