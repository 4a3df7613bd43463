"""Upload metadata: a JSON object whose known keys are validated; the raw bytes are what we keep.

Unknown keys are allowed and kept; the metadata is forwarded to the cloud byte-for-byte as received.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from gateway.errors import ValidationFailed

MAX_DEPTH = 32


class Annotation(msgspec.Struct, kw_only=True):
    class_value: str
    type: str
    geometry: list[float]
    confidence: float | None = None


class KnownMetadata(msgspec.Struct, kw_only=True):
    model_id: str | None = None
    model_version: str | None = None
    source: str | None = None
    timestamp: datetime | None = None
    annotations: list[Annotation] | None = None


def validate_metadata(raw: bytes) -> dict[str, Any]:
    """Raise `ValidationFailed` unless `raw` is a JSON object whose known keys are well formed;
    returns the decoded object (priority classes match on it)."""
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ValidationFailed("metadata is not valid JSON", str(exc)) from None
    except RecursionError:  # msgspec's decoder gives up near 1,000 levels, before _depth can look
        raise ValidationFailed("metadata is nested too deeply", f"more than {MAX_DEPTH} levels") from None
    if not isinstance(value, dict):
        raise ValidationFailed("metadata must be a JSON object", f"got {type(value).__name__}")
    if _depth(value) > MAX_DEPTH:
        raise ValidationFailed("metadata is nested too deeply", f"more than {MAX_DEPTH} levels")
    try:
        known = msgspec.convert(value, KnownMetadata)
    except msgspec.ValidationError as exc:
        raise ValidationFailed("metadata has an invalid field", str(exc)) from None
    if known.timestamp is not None and known.timestamp.tzinfo is None:
        raise ValidationFailed(
            "metadata has an invalid field", "timestamp must be RFC 3339 with an offset - at `$.timestamp`")
    for i, ann in enumerate(known.annotations or []):
        where = f"$.annotations[{i}]"
        if not ann.class_value:
            raise ValidationFailed("metadata has an invalid annotation", f"class_value is empty - at `{where}`")
        if not ann.type:
            raise ValidationFailed("metadata has an invalid annotation", f"type is empty - at `{where}`")
        problem = _geometry_problem(ann)
        if problem:
            raise ValidationFailed("metadata has an invalid annotation", f"{problem} - at `{where}.geometry`")
        if ann.confidence is not None and not 0.0 <= ann.confidence <= 1.0:
            raise ValidationFailed(
                "metadata has an invalid annotation", f"confidence must be in [0, 1] - at `{where}.confidence`"
            )
    return value


def _geometry_problem(ann: Annotation) -> str | None:
    g = ann.geometry
    if any(x != x for x in g):  # NaN
        return "geometry holds NaN"
    if ann.type == "bbox":
        if len(g) != 4:
            return f"bbox geometry needs 4 numbers (cx, cy, w, h), got {len(g)}"
        if not all(0.0 <= x <= 1.0 for x in g):
            return "bbox geometry must be normalised to [0, 1]"
    elif ann.type == "polygon":
        if len(g) < 6 or len(g) % 2:
            return f"polygon geometry needs an even count of at least 6 numbers, got {len(g)}"
        if not all(0.0 <= x <= 1.0 for x in g):
            return "polygon geometry must be normalised to [0, 1]"
    elif not g:
        return "geometry is empty"
    return None


def _depth(value: Any) -> int:
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest
