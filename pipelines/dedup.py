"""Dedup across a whole run: exact (sha256 of the downloaded bytes) and near-duplicate
(64-bit perceptual hash within a Hamming distance).

``DedupIndex`` is plain Python; the Ray wiring (``pipelines/graph.py``) hosts one in an actor
that every shard task asks once per shard. Each hash remembers the sample key that claimed it
first, so a retried shard task that asks again about its own samples is not told they are
duplicates of themselves. On resume the index is rebuilt from the finished shards' parquet.

Near-duplicate lookup uses 8 bands of 8 bits: two hashes within 7 bits share at least one
band exactly (pigeonhole), so candidates come from 8 dict lookups, not a scan.
"""

from __future__ import annotations

from collections.abc import Sequence

_BANDS = 8


def _bands(h: int) -> list[tuple[int, int]]:
    u = h & 0xFFFFFFFFFFFFFFFF
    return [(b, (u >> (8 * b)) & 0xFF) for b in range(_BANDS)]


def hamming(a: int, b: int) -> int:
    return ((a ^ b) & 0xFFFFFFFFFFFFFFFF).bit_count()


class DedupIndex:
    """The seen-set of one run.

    Args:
        exact: dedup by sha256.
        near: dedup by perceptual hash.
        distance: the largest Hamming distance that counts as a near duplicate (0-7).
    """

    def __init__(self, *, exact: bool = True, near: bool = True, distance: int = 4) -> None:
        if not 0 <= distance < _BANDS:
            raise ValueError(f"expected distance in [0, {_BANDS - 1}], got {distance}")
        self.exact, self.near, self.distance = exact, near, distance
        self._sha: dict[str, str] = {}
        self._phash: dict[int, str] = {}
        self._bands: dict[tuple[int, int], list[int]] = {}

    def __len__(self) -> int:
        return max(len(self._sha), len(self._phash))

    def _near_owner(self, h: int, key: str) -> str | None:
        seen: set[int] = set()
        for band in _bands(h):
            for other in self._bands.get(band, ()):
                if other in seen:
                    continue
                seen.add(other)
                owner = self._phash[other]
                if owner != key and hamming(h, other) <= self.distance:
                    return owner
        return None

    def _add(self, key: str, sha: str | None, ph: int | None) -> None:
        if sha is not None:
            self._sha.setdefault(sha, key)
        if ph is not None and ph not in self._phash:
            self._phash[ph] = key
            for band in _bands(ph):
                self._bands.setdefault(band, []).append(ph)

    def claim(self, keys: Sequence[str], sha256s: Sequence[str | None], phashes: Sequence[int | None]) -> list[str | None]:
        """Check and record samples in order; per sample None (new: kept) or a reason naming
        the key that holds the original (``duplicate_of:KEY`` / ``near_duplicate_of:KEY``).

        Args:
            keys: unique sample keys.
            sha256s: hex digests (None skips the exact check for that sample).
            phashes: perceptual hashes as int64 (None skips the near check).
        """
        if not len(keys) == len(sha256s) == len(phashes):
            raise ValueError(f"expected keys, sha256s, phashes of one length, got {len(keys)}, {len(sha256s)}, {len(phashes)}")
        out: list[str | None] = []
        for key, sha, ph in zip(keys, sha256s, phashes):
            reason = None
            if self.exact and sha is not None:
                owner = self._sha.get(sha)
                if owner is not None and owner != key:
                    reason = f"duplicate_of:{owner}"
            if reason is None and self.near and ph is not None:
                owner = self._near_owner(int(ph), key)
                if owner is not None:
                    reason = f"near_duplicate_of:{owner}"
            if reason is None:
                self._add(key, sha if self.exact else None, int(ph) if self.near and ph is not None else None)
            out.append(reason)
        return out

    def add(self, keys: Sequence[str], sha256s: Sequence[str | None], phashes: Sequence[int | None]) -> None:
        """Record kept samples without checking (rebuilding the index from finished shards)."""
        for key, sha, ph in zip(keys, sha256s, phashes):
            self._add(key, sha if self.exact else None, int(ph) if self.near and ph is not None else None)
