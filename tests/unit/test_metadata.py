from __future__ import annotations

import pytest

from gateway.errors import ValidationFailed
from gateway.ingest.metadata import validate_metadata

GOOD = [
    b"{}",
    b'{"model_id": "m", "model_version": "1.2", "source": "line-3", "timestamp": "2026-11-28T10:00:00Z"}',
    b'{"annotations": [{"class_value": "scratch", "type": "bbox", "geometry": [0.5, 0.5, 0.2, 0.1],'
    b' "confidence": 0.93}]}',
    b'{"annotations": [{"class_value": "dent", "type": "polygon", "geometry": [0,0, 1,0, 1,1]}]}',
    b'{"unknown": {"nested": [1, 2, 3]}, "model_id": "m"}',
]
BAD = [
    b"",
    b"not json",
    b"[1, 2]",
    b'"string"',
    b"null",
    b'{"model_id": 5}',
    b'{"timestamp": "yesterday"}',
    b'{"timestamp": "2026-11-28T10:00:00"}',
    b'{"annotations": {}}',
    b'{"annotations": [{"type": "bbox", "geometry": [0.1, 0.1, 0.1, 0.1]}]}',
    b'{"annotations": [{"class_value": "a", "type": "bbox", "geometry": [0.1, 0.1, 0.1]}]}',
    b'{"annotations": [{"class_value": "a", "type": "bbox", "geometry": [0.1, 0.1, 0.1, 1.5]}]}',
    b'{"annotations": [{"class_value": "a", "type": "bbox", "geometry": [0.1, "x", 0.1, 0.1]}]}',
    b'{"annotations": [{"class_value": "a", "type": "bbox", "geometry": [0.1, 0.1, 0.1, 0.1], "confidence": 2}]}',
    b'{"annotations": [{"class_value": "a", "type": "polygon", "geometry": [0.1, 0.1, 0.1]}]}',
    b'{"a":' * 100 + b"1" + b"}" * 100,
]


@pytest.mark.parametrize("raw", GOOD)
def test_good_metadata(raw: bytes) -> None:
    validate_metadata(raw)


@pytest.mark.parametrize("raw", BAD)
def test_bad_metadata(raw: bytes) -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_metadata(raw)
    assert info.value.status == 400 and info.value.code == "VALIDATION_ERROR"
    assert isinstance(info.value.details, str)
