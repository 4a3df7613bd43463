"""File names from devices, made safe for object keys, manifests and Content-Disposition headers."""

from __future__ import annotations

import re
import unicodedata

MAX_NAME_CHARS = 100
_ALLOWED_PUNCT = set("._-()+")
_UNDERSCORES = re.compile(r"_{2,}")


def safe_filename(raw: str | None, content_type: str) -> str:
    """A name with no path separators, no `..`, no control or quoting characters, at most
    `MAX_NAME_CHARS` long (the extension kept); `image.jpg`/`image.png` when nothing is left."""
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
    if len(cleaned) > MAX_NAME_CHARS:
        stem, dot, ext = cleaned.rpartition(".")
        if dot and 0 < len(ext) <= 10:
            cleaned = stem[: MAX_NAME_CHARS - len(ext) - 1].rstrip("._-") + "." + ext
        else:
            cleaned = cleaned[:MAX_NAME_CHARS].rstrip("._-")
    if not cleaned or cleaned.startswith("."):
        return "image.png" if content_type == "image/png" else "image.jpg"
    return cleaned
