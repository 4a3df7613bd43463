"""Object storage behind one interface: `folder` (embedded default) or `minio` (any S3 server)."""

from __future__ import annotations

from gateway.config import Settings
from gateway.storage.base import ObjectInfo, ObjectStore
from gateway.storage.folder import FolderStore

__all__ = ["FolderStore", "ObjectInfo", "ObjectStore", "open_store"]


def open_store(settings: Settings) -> ObjectStore:
    """The store the settings name (not yet checked for readiness)."""
    if settings.storage.backend == "minio":
        from gateway.storage.s3 import S3Store

        return S3Store(settings.minio)
    return FolderStore(settings.data_dir / "objects")
