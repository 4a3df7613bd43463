"""Devices and their keys: the registry (look-up by key hash, keys sealed at rest under the key
secret), provisioning and its one-time tokens, and the key checks against the cloud that admit
or quarantine keys the gateway does not know yet."""
