"""Process plumbing with no domain knowledge: the event loop, the allocator, thread names, token
buckets."""
