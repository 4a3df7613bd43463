"""Object storage behind one interface: `folder` (embedded default) or `minio` (any S3 server)."""

from __future__ import annotations

from gateway.config import Settings
from gateway.outbound import Outbound
from gateway.storage.base import ObjectInfo, ObjectStore
from gateway.storage.folder import FolderStore

__all__ = ["FolderStore", "ObjectInfo", "ObjectStore", "open_store"]


def open_store(settings: Settings, http: Outbound | None = None) -> ObjectStore:
    """The store the settings name (not yet checked for readiness); an S3 store sends images'
    bytes over `http`, the runtime's shared client."""
    if settings.storage.backend == "minio":
        from gateway.storage.s3 import S3Store

        return S3Store(settings.minio, http=http)
    return FolderStore(settings.data_dir / "objects")
