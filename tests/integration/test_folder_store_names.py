"""Folder storage on a real file system: names it refuses are the client's 400, temp files are
never objects, and every object is listed (issue 23, items 3 and 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ValidationFailed
from gateway.storage.folder import FolderStore

pytestmark = pytest.mark.integration


def test_a_name_the_file_system_refuses_is_a_validation_error(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "objects")
    store.ensure_ready()
    with pytest.raises(ValidationFailed):  # 400, never a 503 with Retry-After for a device to retry forever
        store.put_bytes("raw-data/" + "图" * 90 + ".jpg", b"\xff\xd8\xff", "image/jpeg")
    with pytest.raises(ValidationFailed):
        store.put_file("raw-data/" + "x" * 300, _spooled(tmp_path), 3, "image/jpeg")
    assert list(store.list("raw-data/")) == []


def test_temp_files_are_apart_and_every_object_is_listed(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "objects")
    store.ensure_ready()
    store.put_bytes("raw-data/ab_x.tmp", b"one", "image/jpeg")
    store.put_file("raw-data/cd_y.tmp", _spooled(tmp_path), 3, "image/jpeg")
    assert sorted(i.key for i in store.list("raw-data/")) == ["raw-data/ab_x.tmp", "raw-data/cd_y.tmp"]
    assert sorted(i.key for i in store.list("")) == ["raw-data/ab_x.tmp", "raw-data/cd_y.tmp"]
    with pytest.raises(ValueError):
        store.put_bytes(".tmp/anything", b"x", "image/jpeg")  # no key reaches the temp folder
    assert list((tmp_path / "objects" / ".tmp").iterdir()) == []


def _spooled(tmp_path: Path) -> Path:
    path = tmp_path / "spool.part"
    path.write_bytes(b"two")
    return path
