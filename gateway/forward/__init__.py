"""The path of a forward: the outbox (a durable queue in the catalog) -> `worker.Forwarder` (order,
concurrency, the outage gate, backoff) -> `client.CloudClient` (one upload as the device) -> the
entry marked delivered; `cache` keeps bytes near at hand and `retention` removes delivered bytes;
`bytes_lifecycle` holds every transition of an image's local bytes (stored, cached, delivered, removed)."""
