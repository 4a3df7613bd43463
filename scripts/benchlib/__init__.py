"""Pieces of `scripts/bench`: load generators, the discard endpoint, catalog and forwarder runs."""
