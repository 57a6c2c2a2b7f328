"""What a node keeps of each job, and for how long (``[retention]`` in its config).

A job's reply is kept in the node's database so that a redelivered job answers the same
(one result, one charge). Once ``replies`` seconds have passed since it was recorded, the
job's answer has long left the result backend (``results`` ≤ ``replies``) and its
requester has read it or given up; the reply's body goes, and the job's row stays with its
status, as the record that it ran: a delivery of it after that is answered "already
answered", never run again. Ledger charges and approval requests are never pruned.

The worker prunes as it serves: every ``prune_every`` seconds at most ``prune_batch`` rows,
read through an index of the replies still kept, so a pass costs the same however many jobs
the node has run; a full batch means it is behind, and the next job prunes again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from workers.config import RetentionSection
from workers.storage.store import Store

log = logging.getLogger(__name__)


class Pruner:
    """Drops the reply bodies of jobs older than the node's retention, a batch at a time."""

    def __init__(self, store: Store, retention: RetentionSection, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.retention = retention
        self.clock = clock
        self.next_at = 0.0  # the first job after a start prunes

    def tick(self) -> int:
        """Prune if a pass is due; how many replies were dropped. A failure (the database busy)
        is logged and tried again at the next pass: it never fails the job being served."""
        now = self.clock()
        if now < self.next_at:
            return 0
        r = self.retention
        try:
            pruned = self.store.prune_replies(now - r.replies, r.prune_batch)
        except SQLAlchemyError as exc:
            log.warning("pruning job replies failed, tried again in %.0f s: %s", r.prune_every, exc)
            pruned = 0
        self.next_at = now if pruned >= r.prune_batch else now + r.prune_every
        if pruned:
            log.info("dropped the replies of %d job(s) answered more than %.0f s ago", pruned, r.replies)
        return pruned
