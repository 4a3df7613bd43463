"""The path of an upload, from the device's request to the 201.

`api/device.py` hands the request to `admission.Admission` (key, rate limit, size, `capacity`,
store), then `form` parses the multipart body while `pipeline.Ingestor` hashes it (xxHash), asks `seen` and
the catalog whether it is a duplicate, then stores the object (`storage/`) and journals the catalog
rows (image, batch, outbox entry) side by side before answering; `storing` names the images
recorded whose objects are not yet stored. `reconcile` settles what a crash left between the
store and the catalog; `fingerprint`/`neardup` hold back near-identical frames.
"""
