"""Key files on disk: the secret one readable only by its owner, the public one by anyone."""

from __future__ import annotations

import os
from pathlib import Path

from protocol.errors import InvalidRequest
from protocol.identity import NAME, Identity, unreadable_key


def write_identity(folder: Path, name: str, *, overwrite: bool = False) -> Identity:
    """Create ``NAME.key`` (mode 0600) and ``NAME.pub`` in ``folder``; return the identity.
    ``NAME`` is one an envelope's sender may have — so it holds no '/', and ``../evil``
    cannot put a key outside ``folder``."""
    if not NAME.fullmatch(name):
        raise InvalidRequest(f"{name!r} cannot name an identity: use 1 to 64 letters, digits, '_', '.' or '-' "
                             "(e.g. 'zoe', 'st-marys'), and say where the key goes with --dir")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = Identity.generate(name)
    secret = folder / f"{name}.key"
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(secret, flags, 0o600)
    except FileExistsError:
        raise InvalidRequest(f"{secret} exists; refusing to overwrite a key (--force replaces it, and "
                             "everyone who knows its public key must be given the new one)") from None
    with os.fdopen(fd, "w") as f:
        f.write(identity.to_json())
    os.chmod(secret, 0o600)
    (folder / f"{name}.pub").write_text(identity.public.text() + "\n")
    return identity


def read_identity(path: str | Path) -> Identity:
    """A secret key file's identity, refused if others may read it (as ssh refuses one)."""
    file = Path(path).expanduser()
    try:
        status, text = file.stat(), file.read_text()
    except OSError as exc:
        raise unreadable_key(file, exc) from None
    return Identity.from_key_file(file, text, status.st_mode, status.st_uid == os.getuid())
