"""The gateway's nonces, kept in its registry database (a :class:`protocol.envelope.NonceStore`).

In memory they were forgotten at every restart, and a node's message stays valid for as
long as it may wait in the queue: a captured publication could be sent again once the
gateway restarted. Rows live until their envelope expires (an expired envelope is refused
before its nonce is looked at), swept now and then. The same approach as a node's store
(``workers.storage.store.Store.remember``): the primary key decides, so two gateway processes
agree on which delivery came first.
"""

from __future__ import annotations

import time

from sqlalchemy import Float, String, delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from workers.gateway.registry import Registry

SWEEP_EVERY = 512  # remembers between two sweeps of expired rows: not a DELETE per message


class _Base(DeclarativeBase):
    pass


class NonceRow(_Base):
    __tablename__ = "nonces"
    sender: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(String(80))
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class RegistryNonces:
    """Nonces seen by the gateway, in the registry's database: they survive a restart."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        _Base.metadata.create_all(registry.engine)
        self._remembered = 0

    def remember(self, sender: str, nonce: str, delivery_id: str, expires_at: float) -> bool:
        """True if the nonce is new, or was seen before under this same delivery id (a broker
        redelivering the message, not a replay)."""
        if self._remembered % SWEEP_EVERY == 0:  # the first message after a start sweeps too
            self.forget_expired(time.time())
        self._remembered += 1
        try:
            with self.registry.session() as s:
                s.add(NonceRow(sender=sender, nonce=nonce, delivery_id=delivery_id, expires_at=expires_at))
        except IntegrityError:
            with self.registry.session() as s:
                row = s.get(NonceRow, (sender, nonce))
                return row is not None and row.delivery_id == delivery_id
        return True

    def forget_expired(self, now: float) -> int:
        """Drop the nonces of envelopes expired before ``now``; how many were dropped."""
        with self.registry.session() as s:
            return int(s.execute(delete(NonceRow).where(NonceRow.expires_at < now)).rowcount)  # type: ignore[attr-defined]
