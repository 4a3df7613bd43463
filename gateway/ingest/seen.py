"""A Bloom filter of the dedup keys the catalog holds: most uploads are new, and for them it
answers "certainly not stored" in microseconds instead of a catalog look-up.

No false negatives: every key is added when an upload claims it (before its commit), and the
filter is rebuilt from the catalog at start-up. A positive answer is only "maybe": the catalog
decides. Sized for `capacity` keys at about 1 % false positives, and regrown when exceeded.
"""

from __future__ import annotations

import math

import xxhash

_HASHES = 7


class SeenKeys:
    def __init__(self, capacity: int = 1 << 20) -> None:
        self._reset(capacity)

    def _reset(self, capacity: int) -> None:
        self.capacity = capacity
        self.bits = max(1 << 16, int(-capacity * math.log(0.01) / (math.log(2) ** 2)))
        self._array = bytearray((self.bits + 7) // 8)
        self.count = 0

    def _positions(self, key: str) -> list[int]:
        digest = xxhash.xxh3_128_intdigest(key.encode())
        h1, h2 = digest & 0xFFFFFFFFFFFFFFFF, (digest >> 64) | 1
        return [(h1 + i * h2) % self.bits for i in range(_HASHES)]

    def add(self, key: str) -> None:
        for pos in self._positions(key):
            self._array[pos >> 3] |= 1 << (pos & 7)
        self.count += 1

    def __contains__(self, key: str) -> bool:
        return all(self._array[pos >> 3] & (1 << (pos & 7)) for pos in self._positions(key))

    @property
    def full(self) -> bool:
        return self.count > self.capacity
