"""Enrolling nodes at the gateway: the operator admits a node's id and public key into the
gateway's registry database (``workers.gateway.registry``); the gateway refuses registrations
and publications from any other node, or signed with any other key.

    gridq enrol hospital --key hospital.pub     # on the gateway's host

The embedded grid (``ops.local``) and compose's ``init`` enrol the nodes whose keys they
generate; a real deployment enrols each node from the public key its owner hands over.

The broker's users follow enrolment (:func:`sync_broker_users`): each enrolled node has a
Redis user of its own (``node-<id>``, ops/acl.py), and scientists may send only to enrolled
nodes' queues; ``gridq enrol``/``unenrol`` update them in the running broker.
"""

from __future__ import annotations

from pathlib import Path

from ops.broker_users import BrokerUsers, follow_enrolments
from protocol.errors import InvalidRequest, NotFound
from workers.gateway.registry import Registry

GATEWAY_DB = "gateway.db"  # in $GRIDQ_HOME, where `gridq gateway start` keeps its registry by default


def gateway_database(home: Path) -> str:
    """The SQLAlchemy URL of the registry a gateway keeps in ``home`` (the embedded grid's,
    compose's, and the default of `gridq gateway start` and `gridq enrol`)."""
    return f"sqlite:///{Path(home).expanduser().resolve() / GATEWAY_DB}"


def read_public_key(path: Path) -> str:
    """The public key text of a ``NAME.pub`` file; a secret key file is refused (the
    operator needs the node's public key only, and should never be handed its secret)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text().strip()
    except FileNotFoundError:
        raise NotFound(f"no public key file at {file}: the node's owner writes it with `gridq keys new NAME` "
                       "(NAME.pub, next to NAME.key) and hands it over") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot read {file}: {exc.strerror}") from None
    if text.startswith("{"):
        raise InvalidRequest(f"{file} is a secret key file; enrol a node with its public key (NAME.pub), and "
                             "keep the secret one on the node")
    return text


def enrol(database_url: str, node: str, key_file: Path, *, replace: bool = False) -> bool:
    """Enrol ``node`` with the public key in ``key_file``; False if it already was, with it."""
    registry = Registry(database_url)
    try:
        return registry.enrol(node, read_public_key(key_file), replace=replace)
    finally:
        registry.engine.dispose()


def enrolled_nodes(database_url: str) -> list[str]:
    """The ids of the nodes enrolled in the gateway's registry at ``database_url``."""
    registry = Registry(database_url)
    try:
        return [node for node, _key in registry.enrolments()]
    finally:
        registry.engine.dispose()


def sync_broker_users(home: Path, database_url: str | None = None) -> BrokerUsers | None:
    """Make the broker users under ``home/broker`` follow the enrolments (in ``database_url``,
    default the gateway's registry in ``home``): a user for each enrolled node, none for the
    others, applied to the running broker as well. None if ``home`` keeps no broker users
    (ops.broker_users.follow_enrolments); BrokerUnavailable if the broker could not be told."""
    return follow_enrolments(home, enrolled_nodes(database_url or gateway_database(home)))
