"""Dedup across a whole run: exact (sha256 of the downloaded bytes) and near-duplicate
(64-bit perceptual hash within a Hamming distance AND a colour signature within a tolerance).

pHash alone is luminance-only and keeps just the signs of the 8x8 lowest DCT frequencies, so
distinct images that share a layout or texture (one background pattern with small shapes of
other colours, a product shot in several colourways) get hashes within a few bits. A near
duplicate must therefore also agree in colour layout: ``imaging.colour_signature``, the mean
RGB of a 4x4 grid, no cell-channel further apart than ``colour_distance`` (0-255 units).
Re-encoding, recompression and resizing move those means by a few units; a different shape
colour or background moves at least one of them by far more.

``DedupIndex`` is plain Python; the Ray wiring (``pipelines/graph.py``) hosts one in an actor
that every shard task asks once per shard. Each hash remembers the sample key that claimed it
first, so a retried shard task that asks again about its own samples is not told they are
duplicates of themselves. On resume the index is rebuilt from the finished shards' parquet.
A sample without a colour signature (a parquet written before it existed) is never a near
duplicate, nor the original of one: exact dedup still applies to it, near dedup does not,
because a colour-blind match is the false positive this module guards against.

Near-duplicate lookup is multi-index hashing with probing: the 64 bits are cut into ``m``
bands, and two hashes within ``distance`` bits have some band within ``r`` bits of each other
when ``m * (r + 1) > distance`` (pigeonhole). Each kept hash is filed under its ``m`` band
values; a lookup asks for the query's band values and, with ``r = 1``, each of them with one
bit flipped. Up to distance 2: ``r = 0``, ``distance + 1`` bands of >= 21 bits, exact band
lookups; from 3: ``r = 1``, ``distance // 2 + 1`` bands, so at the default distance 4 three
bands of 21-22 bits (66 lookups, 2M+ buckets a band) instead of five of 12-13 bits (4,096+
buckets). Wider bands keep the buckets near-empty as the index grows: with the narrow bands a
lookup's candidates grew with the run (pHashes of one kind of image cluster: ~600 per bucket
after 30,000 textured images, 2.2 CPU-s for 30,000 claims).
"""

from __future__ import annotations

from collections.abc import Sequence

_MAX_DISTANCE = 7


def _band_layout(distance: int) -> tuple[list[tuple[int, int, int]], int]:
    """The bands that tile the 64 bits, as (shift, mask, width), and the probing radius ``r``
    (0 or 1): some band of two hashes within ``distance`` bits is within ``r`` bits."""
    radius = 0 if distance <= 2 else 1
    n = distance // (radius + 1) + 1
    widths = [64 // n + (1 if b < 64 % n else 0) for b in range(n)]
    layout, shift = [], 0
    for w in widths:
        layout.append((shift, (1 << w) - 1, w))
        shift += w
    return layout, radius


def hamming(a: int, b: int) -> int:
    return ((a ^ b) & 0xFFFFFFFFFFFFFFFF).bit_count()


def _sig(s: str | None) -> bytes | None:
    return bytes.fromhex(s) if s else None


class DedupIndex:
    """The seen-set of one run.

    Args:
        exact: dedup by sha256.
        near: dedup by perceptual hash and colour signature.
        distance: the largest pHash Hamming distance that counts as a near duplicate (0-7).
        colour_distance: the largest colour-signature difference (any cell's mean R, G or B,
            0-255 units) that counts as a near duplicate.
    """

    def __init__(self, *, exact: bool = True, near: bool = True, distance: int = 4, colour_distance: int = 8) -> None:
        if not 0 <= distance <= _MAX_DISTANCE:
            raise ValueError(f"expected distance in [0, {_MAX_DISTANCE}], got {distance}")
        if not 0 <= colour_distance <= 255:
            raise ValueError(f"expected colour_distance in [0, 255], got {colour_distance}")
        self.exact, self.near, self.distance, self.colour_distance = exact, near, distance, colour_distance
        self._sha: dict[str, str] = {}
        self._phash: dict[int, list[tuple[bytes | None, str]]] = {}  # pHash -> (colour signature, key) kept
        self._layout, self._radius = _band_layout(distance)
        self._bands: list[dict[int, list[int]]] = [{} for _ in self._layout]  # per band: value -> pHashes
        self._near_count = 0

    def _band_values(self, h: int) -> list[int]:
        u = h & 0xFFFFFFFFFFFFFFFF
        return [(u >> shift) & mask for shift, mask, _ in self._layout]

    def _candidate_lists(self, h: int) -> list[list[int]]:
        """The buckets of kept pHashes that share a band with ``h`` within the probing radius."""
        out = []
        for band, value, (_, _, width) in zip(self._bands, self._band_values(h), self._layout):
            hit = band.get(value)
            if hit:
                out.append(hit)
            if self._radius:
                for i in range(width):
                    hit = band.get(value ^ (1 << i))
                    if hit:
                        out.append(hit)
        return out

    def __len__(self) -> int:
        return max(len(self._sha), self._near_count)

    def _colour_close(self, a: bytes | None, b: bytes | None) -> bool:
        if a is None or b is None:
            return False  # unknown colour: never a near duplicate (see the module doc)
        if len(a) != len(b):
            raise ValueError(f"expected colour signatures of one length, got {len(a)} and {len(b)} bytes")
        return max(abs(x - y) for x, y in zip(a, b)) <= self.colour_distance

    def _near_owner(self, h: int, sig: bytes | None, key: str) -> str | None:
        if sig is None:
            return None
        seen: set[int] = set()
        distance = self.distance
        for bucket in self._candidate_lists(h):
            for other in bucket:
                if ((h ^ other) & 0xFFFFFFFFFFFFFFFF).bit_count() > distance or other in seen:
                    continue
                seen.add(other)  # within distance: its colours are checked once
                for other_sig, owner in self._phash[other]:
                    if owner != key and self._colour_close(sig, other_sig):
                        return owner
        return None

    def _add(self, key: str, sha: str | None, ph: int | None, sig: bytes | None) -> None:
        if sha is not None:
            self._sha.setdefault(sha, key)
        if ph is None:
            return
        entries = self._phash.get(ph)
        if entries is None:
            entries = self._phash[ph] = []
            for band, value in zip(self._bands, self._band_values(ph)):
                band.setdefault(value, []).append(ph)
        if (sig, key) not in entries:  # a retried shard re-adds its own samples
            entries.append((sig, key))
            self._near_count += 1

    def claim(
        self,
        keys: Sequence[str],
        sha256s: Sequence[str | None],
        phashes: Sequence[int | None],
        colour_sigs: Sequence[str | None],
    ) -> list[str | None]:
        """Check and record samples in order; per sample None (new: kept) or a reason naming
        the key that holds the original (``duplicate_of:KEY`` / ``near_duplicate_of:KEY``).

        Args:
            keys: unique sample keys.
            sha256s: hex digests (None skips the exact check for that sample).
            phashes: perceptual hashes as int64 (None skips the near check).
            colour_sigs: ``imaging.colour_signature`` hex strings (None skips the near check).
        """
        if not len(keys) == len(sha256s) == len(phashes) == len(colour_sigs):
            raise ValueError(
                "expected keys, sha256s, phashes, colour_sigs of one length, "
                f"got {len(keys)}, {len(sha256s)}, {len(phashes)}, {len(colour_sigs)}"
            )
        out: list[str | None] = []
        for key, sha, ph, cs in zip(keys, sha256s, phashes, colour_sigs):
            sig = _sig(cs)
            reason = None
            if self.exact and sha is not None:
                owner = self._sha.get(sha)
                if owner is not None and owner != key:
                    reason = f"duplicate_of:{owner}"
            if reason is None and self.near and ph is not None:
                owner = self._near_owner(int(ph), sig, key)
                if owner is not None:
                    reason = f"near_duplicate_of:{owner}"
            if reason is None:
                self._add(key, sha if self.exact else None, int(ph) if self.near and ph is not None else None, sig)
            out.append(reason)
        return out

    def add(
        self,
        keys: Sequence[str],
        sha256s: Sequence[str | None],
        phashes: Sequence[int | None],
        colour_sigs: Sequence[str | None],
    ) -> None:
        """Record kept samples without checking (rebuilding the index from finished shards)."""
        for key, sha, ph, cs in zip(keys, sha256s, phashes, colour_sigs):
            self._add(key, sha if self.exact else None, int(ph) if self.near and ph is not None else None, _sig(cs))
