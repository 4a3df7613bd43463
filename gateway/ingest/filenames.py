"""File names from devices, made safe for object keys, manifests and Content-Disposition headers."""

from __future__ import annotations

import re
import unicodedata

MAX_NAME_CHARS = 100
# In UTF-8 bytes: a storage key's last part is `<uuid-hex>_<name>` (33 bytes more) and folder storage
# and the drain job add a suffix of their own; file systems allow 255 bytes per name.
MAX_NAME_BYTES = 200
_ALLOWED_PUNCT = set("._-()+")
_UNDERSCORES = re.compile(r"_{2,}")


def safe_filename(raw: str | None, content_type: str) -> str:
    """A name with no path separators, no `..`, no control or quoting characters, at most
    `MAX_NAME_CHARS` characters and `MAX_NAME_BYTES` UTF-8 bytes long (the extension kept);
    `image.jpg`/`image.png` when nothing is left."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFC", name)
    out = []
    for ch in name:
        if ch.isalnum() or ch in _ALLOWED_PUNCT:
            out.append(ch)
        elif unicodedata.category(ch)[0] in "CZ" or not ch.isprintable():
            out.append("_")
        else:
            out.append("_")
    cleaned = "".join(out)
    while ".." in cleaned:
        cleaned = cleaned.replace("..", ".")
    cleaned = _UNDERSCORES.sub("_", cleaned).strip("._- ")
    cleaned = cap_name(cleaned, MAX_NAME_CHARS, MAX_NAME_BYTES)
    if not cleaned or cleaned.startswith("."):
        return "image.png" if content_type == "image/png" else "image.jpg"
    return cleaned


def cap_name(name: str, max_chars: int, max_bytes: int) -> str:
    """`name` cut to at most `max_chars` characters and `max_bytes` UTF-8 bytes, on a character
    boundary, keeping a short extension (up to 10 characters) where there is one."""
    if len(name) <= max_chars and len(name.encode()) <= max_bytes:
        return name
    stem, dot, ext = name.rpartition(".")
    if not (dot and 0 < len(ext) <= 10 and stem):
        stem, ext = name, ""
    tail = "." + ext if ext else ""
    room_chars, room_bytes = max_chars - len(tail), max_bytes - len(tail.encode())
    # errors="ignore" drops a character cut in half at the end: the cut lands on a boundary.
    cut = stem[:room_chars].encode()[:room_bytes].decode("utf-8", "ignore")
    return cut.rstrip("._-") + tail
