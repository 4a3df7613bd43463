"""Device keys: format, hashing for look-up, and encryption at rest.

A device authenticates with `adk_` + 32 lowercase hex characters. The catalog keeps
`key_hash` (SHA-256 of the key) to find a device and `key_sealed` (AES-GCM under a secret kept
outside the data folder) because the forwarder must act as the device towards the cloud.
A copy of the data folder therefore holds no usable key unless the secret file is copied too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_PATTERN = re.compile(r"adk_[0-9a-f]{32}")
_NONCE_BYTES = 12


def generate_key() -> str:
    return "adk_" + secrets.token_hex(16)


def is_well_formed(key: str) -> bool:
    return KEY_PATTERN.fullmatch(key) is not None


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def redact(key: str) -> str:
    """What a log line may show of a key: its prefix and a short hash, never the key; labelled so
    that it is not mistaken for a key."""
    return f"adk_…(redacted, hash {key_hash(key)[:8]})" if key else ""


class KeyUnreadable(Exception):
    """A sealed device key does not open under this secret (another secret, or damaged bytes)."""


class KeyBox:
    """Seals and opens device keys with AES-GCM under a 32-byte secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise ValueError("key secret must be 32 bytes")
        self._aead = AESGCM(secret)
        # Names the secret without revealing it: kept in the catalog, compared at every start.
        self.fingerprint = hmac.new(secret, b"acusight-gateway key secret fingerprint", hashlib.sha256).hexdigest()[:32]

    @classmethod
    def from_file(cls, path: Path) -> KeyBox:
        """Read the secret, creating it (mode 0600) on first use."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
                fh.flush()
                os.fsync(fh.fileno())
        return cls(path.read_bytes())

    def seal(self, key: str) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, key.encode(), b"device-key")

    def open(self, sealed: bytes) -> str:
        """The key in clear; `KeyUnreadable` when it was not sealed under this secret or is damaged."""
        nonce, body = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, body, b"device-key").decode()
        except (InvalidTag, ValueError, UnicodeDecodeError) as exc:
            raise KeyUnreadable("the sealed key does not open under the key secret") from exc
