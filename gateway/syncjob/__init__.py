"""The path of a drain, client side: a cloud sync job lists a gateway's sealed batches, copies each
object and manifest into a folder, verifies the hashes, then acknowledges the batch."""
