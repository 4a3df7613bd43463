"""Store-and-forward to the cloud: the outbox (durable queue in the catalog) and its worker."""
