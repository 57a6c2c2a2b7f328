"""The Celery app Flower runs with: gridq's settings (msgpack/JSON, never pickle), on the
broker named by ``GRIDQ_BROKER``. A bare ``celery flower`` would accept JSON only and fail
to read the workers' msgpack replies.

Also what ``gridq flower`` checks before it starts Flower: Flower off this machine's
loopback needs HTTP basic auth (its UI and API can revoke jobs and shut workers down), given
as a file of one line ``user:password`` (``--auth-file``, mode 0600: docker compose's
``init`` writes ``/var/lib/gridq/flower.auth``) or as ``FLOWER_BASIC_AUTH``."""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from orchestrator.app import make_celery
from protocol.errors import InvalidRequest, NotFound

app = make_celery(os.environ.get("GRIDQ_BROKER", "redis://127.0.0.1:6379/0"), name="gridq-flower")

_CREDENTIAL = re.compile(r"[^\s:,]+:[^\s,]+")  # Flower splits FLOWER_BASIC_AUTH on commas


def basic_auth(auth_file: Path | None) -> str:
    """The ``user:password`` Flower is to ask for: from ``auth_file``, else from
    ``$FLOWER_BASIC_AUTH`` (several, comma-separated), else ``""`` (none)."""
    if auth_file is None:
        given = os.environ.get("FLOWER_BASIC_AUTH", "").strip()
        if given and not all(_CREDENTIAL.fullmatch(c) for c in given.split(",")):
            raise InvalidRequest("FLOWER_BASIC_AUTH must be user:password (or several, comma-separated), "
                                 "without spaces")
        return given
    path = auth_file.expanduser()
    try:
        mode = path.stat().st_mode & 0o777
        text = path.read_text()
    except FileNotFoundError:
        raise NotFound(f"no Flower auth file at {path}: write one line 'user:password' to it (mode 0600); in "
                       "docker compose the init service writes /var/lib/gridq/flower.auth") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot read the Flower auth file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise InvalidRequest(f"the Flower auth file {path} is readable by others (mode {mode:04o}): "
                             f"chmod 600 {path}")
    credential = text.strip()
    if not _CREDENTIAL.fullmatch(credential):
        raise InvalidRequest(f"the Flower auth file {path} must hold one line 'user:password' (no spaces or "
                             "commas)")
    return credential


def run(argv: list[str]) -> NoReturn:
    """Run Flower (``celery`` with ``argv``) and end the process as soon as Flower stops.

    Flower stops its loop on SIGTERM (or Ctrl-C), but Python then joins its thread pool
    before exiting, and with the broker gone a thread in it is retrying a broadcast
    (``enable_events``, every 5 s) under kombu's retry policy — for many minutes: the process
    never ended. So once Flower is done, the exit handlers run (Flower's own stop, logging's
    flush) and the process ends without waiting for threads that only talk to the broker."""
    from celery.bin.celery import main as celery_main

    sys.argv = argv
    code = 0
    try:
        celery_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_loopback(address: str) -> bool:
    """Whether Flower bound to ``address`` is reachable from this machine only ("" binds
    every interface)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
