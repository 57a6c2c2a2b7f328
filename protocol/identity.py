"""Identities: an Ed25519 key to sign with and an X25519 key to be sealed to (PyNaCl).

Two keys, not one converted into the other, so that signing and encryption never share
key material. A public identity travels as one string, ``gridq1:<base64url of 64 bytes>``
(signing key ‖ sealing key), short enough to paste into a node config.

This module does no I/O: key files are JSON text that callers read and write.

    >>> me = Identity.generate("alice")
    >>> text = me.to_json()                       # the secret key file's content
    >>> Identity.from_json(text).public == me.public
    True
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from protocol.errors import BadSignature, GridError, InvalidRequest, NotFound

_PREFIX = "gridq1:"
NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # what an envelope's sender may be called


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), altchars=b"-_", validate=True)


@dataclass(frozen=True)
class PublicIdentity:
    """What everyone may know about a participant: its name and its two public keys."""

    name: str
    verify_key: bytes
    box_key: bytes

    @classmethod
    def parse(cls, name: str, text: str) -> PublicIdentity:
        if not text.startswith(_PREFIX):
            raise InvalidRequest(f"public key of {name!r} must start with {_PREFIX!r}")
        try:
            raw = _unb64(text[len(_PREFIX):])
        except (ValueError, UnicodeEncodeError) as exc:
            raise InvalidRequest(f"public key of {name!r} is not valid base64: {exc}") from None
        if len(raw) != 64:
            raise InvalidRequest(f"public key of {name!r} must hold 64 bytes, not {len(raw)}")
        return cls(name, raw[:32], raw[32:])

    def text(self) -> str:
        return _PREFIX + _b64(self.verify_key + self.box_key)

    def verify(self, message: bytes, signature: bytes) -> None:
        try:
            VerifyKey(self.verify_key).verify(message, signature)
        except (BadSignatureError, ValueError):
            raise BadSignature(f"signature does not match the key of {self.name!r}") from None

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt so that only this identity can read (anonymous sender, X25519 sealed box)."""
        return SealedBox(PublicKey(self.box_key)).encrypt(plaintext)


@dataclass(frozen=True)
class Identity:
    """A participant's secret keys. Keep it in a file readable only by its owner."""

    name: str
    signing_key: bytes
    box_secret: bytes

    @classmethod
    def generate(cls, name: str) -> Identity:
        return cls(name, bytes(SigningKey.generate()), bytes(PrivateKey.generate()))

    @property
    def public(self) -> PublicIdentity:
        verify = bytes(SigningKey(self.signing_key).verify_key)
        box = bytes(PrivateKey(self.box_secret).public_key)
        return PublicIdentity(self.name, verify, box)

    def sign(self, message: bytes) -> bytes:
        return SigningKey(self.signing_key).sign(message).signature

    def unseal(self, ciphertext: bytes) -> bytes:
        try:
            return SealedBox(PrivateKey(self.box_secret)).decrypt(ciphertext)
        except CryptoError:
            raise BadSignature(f"sealed value cannot be opened with the key of {self.name!r}") from None

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "signing_key": _b64(self.signing_key),
                "box_secret": _b64(self.box_secret),
                "public_key": self.public.text(),
            },
            indent=2,
        )

    @classmethod
    def from_key_file(cls, file: Path, text: str, mode: int, mine: bool) -> Identity:
        """The identity in a secret key file, read by the caller (``text``, its ``mode`` and
        whether it is ``mine``). As ssh refuses an UNPROTECTED PRIVATE KEY FILE, a file of
        yours that group or others may read is refused: whoever read it can sign and unseal as
        you. (Like ssh, a file owned by another user — mounted in by root, say — is not judged.)"""
        if text.lstrip().startswith(_PREFIX):
            raise InvalidRequest(f"{file} is a public key, which cannot sign: an identity is the secret key file "
                                 f"({file.with_suffix('.key').name}) that `gridq keys new` wrote next to it")
        if mine and mode & 0o077:
            raise InvalidRequest(f"UNPROTECTED KEY FILE: {file} has mode {mode & 0o777:04o}, so others may read the "
                                 f"secret key in it; refused. Run `chmod 600 {file}` (and make a new key with `gridq "
                                 "keys new` if someone may have read it)")
        try:
            return cls.from_json(text)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{file}: {exc.message}") from None

    @classmethod
    def from_json(cls, text: str) -> Identity:
        if text.lstrip().startswith(_PREFIX):
            raise InvalidRequest("this is a public key (a NAME.pub file), which cannot sign: an identity is the secret "
                                 "key file NAME.key that `gridq keys new` wrote next to it")
        try:
            data = json.loads(text)
            keys = _unb64(data["signing_key"]), _unb64(data["box_secret"])
            name = data["name"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidRequest(f"not a gridq key file: {exc!r}") from None
        if not isinstance(name, str) or any(len(k) != 32 for k in keys):
            raise InvalidRequest("not a gridq key file: a name and two 32-byte keys are needed")
        return cls(name, *keys)


def unreadable_key(file: Path, exc: OSError) -> GridError:
    """The typed error for a key file that cannot be read, naming the fix. (The reading is
    the caller's: this package does no I/O.)"""
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"no key file at {file}: create one with `gridq keys new {file.stem} --dir {file.parent}`, "
                        "or pass the path of an existing one")
    return InvalidRequest(f"cannot read the key file {file}: {exc.strerror}")
