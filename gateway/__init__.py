"""AcuSight edge ingest gateway: device uploads in, deduplicated, stored locally, forwarded to the cloud."""

__version__ = "0.1.0"
