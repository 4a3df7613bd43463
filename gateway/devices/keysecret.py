"""The key secret at start: found where the settings say, and the one the catalog's keys were sealed with.

A missing secret used to be replaced silently by a new one: devices still logged in (look-up is
by hash) but no sealed key could be opened again, so forwarding failed for good. Now the secret's
fingerprint is kept in the catalog (`gateway_facts`), and a start whose secret is missing or
different while sealed keys exist is refused (`StartRefused`, exit status 2), naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gateway.catalog import Catalog, Conn
from gateway.devices.keys import KeyBox, KeyUnreadable
from gateway.errors import StartRefused

log = logging.getLogger("gateway")
FINGERPRINT = "key_secret_fingerprint"
_HOW = "point keys.secret_file (or GATEWAY_KEYS_SECRET_FILE) at the file the device keys were sealed with"


def secret_path(setting: str) -> Path:
    """The secret file's absolute path: a relative setting is taken from the working directory."""
    return Path(setting).expanduser().resolve()


def _facts(conn: Conn) -> tuple[str | None, int, bytes | None]:
    fp = conn.execute("SELECT value FROM gateway_facts WHERE name = ?", [FINGERPRINT]).fetchone()
    (sealed,) = conn.execute("SELECT count(*) FROM devices WHERE key_sealed IS NOT NULL").fetchone() or (0,)
    one = conn.execute("SELECT key_sealed FROM devices WHERE key_sealed IS NOT NULL LIMIT 1").fetchone()
    return (fp[0] if fp else None), int(sealed), (bytes(one[0]) if one else None)


async def open_keybox(catalog: Catalog, setting: str) -> KeyBox:
    """The key box for this catalog, creating the secret only where no key was sealed before."""
    path = secret_path(setting)
    stored, sealed, sample = await catalog.read(_facts)
    if not path.exists() and (stored or sealed):
        raise StartRefused(
            f"the key secret {path} is missing, but the catalog holds {sealed} device key(s) sealed with a "
            f"secret (fingerprint {(stored or '?')[:12]}). A new secret would make them unreadable and "
            f"forwarding would fail for good. Restore the file, or {_HOW}")
    box = KeyBox.from_file(path)
    if stored is not None and stored != box.fingerprint:
        raise StartRefused(
            f"the key secret {path} does not match the one the catalog's {sealed} device key(s) were sealed "
            f"with (fingerprint {box.fingerprint[:12]}, expected {stored[:12]}). Restore the right file, or {_HOW}")
    if stored is None:
        if sample is not None:  # keys sealed before fingerprints were kept: one must open
            try:
                box.open(sample)
            except KeyUnreadable:
                raise StartRefused(
                    f"the key secret {path} does not open the catalog's sealed device keys. Restore the right "
                    f"file, or {_HOW}") from None
        fingerprint = box.fingerprint
        await catalog.write(lambda c: c.execute(
            "INSERT OR REPLACE INTO gateway_facts VALUES (?, ?)", [FINGERPRINT, fingerprint]))
    log.info("key secret: %s (fingerprint %s)", path, box.fingerprint[:12])
    return box


class KeySecret:
    """The key box under `[keys] secret_file`, read and checked against the catalog at start (`load`)."""

    def __init__(self, catalog: Catalog, setting: str) -> None:
        self.catalog = catalog
        self.setting = setting
        self._box: KeyBox | None = None

    async def load(self) -> None:
        """Open the secret once the catalog is open; `StartRefused` when it is not the catalog's."""
        self._box = await open_keybox(self.catalog, self.setting)

    @property
    def fingerprint(self) -> str:
        """The secret's fingerprint, as `gateway_facts` keeps it (backups record it)."""
        return self._opened().fingerprint

    def seal(self, key: str) -> bytes:
        return self._opened().seal(key)

    def open(self, sealed: bytes) -> str:
        return self._opened().open(sealed)

    def _opened(self) -> KeyBox:
        if self._box is None:
            raise RuntimeError("the key secret is read at start (KeySecret.load)")
        return self._box
