"""Batches: how images are grouped, sealed and handed to a sync job.

`lifecycle` moves a batch collecting -> sealed -> forwarded/drained (by count, timeout or hand);
`manifests` writes each sealed batch's Parquet manifest next to its objects; `queries` are the
catalog reads the sync API and the CLI share. The drain itself is `api/sync.py` (server side)
and `syncjob/` (the client that copies, verifies and acknowledges).
"""
