"""Global duplicate detection: duplicate ids, exact and near-duplicate texts (pure compute, no Ray).

Every record becomes a few small *key rows* ``(key, seq, id, origin, sketch)``: its id, a hash of its
text, and one hash per MinHash LSH band (carrying a 1-byte-per-permutation sketch of the signature).
Sorting the key rows (a distributed sort on Ray Data) puts the records sharing a key next to each
other; :func:`repeated_keys` keeps only those, so the driver receives candidate groups, never the
corpus or its signatures. :func:`resolve_duplicates` then keeps the first record of every group
(smallest ``seq``, i.e. first by source, file and line) and marks the others. Near-duplicate
candidates (records sharing a band) are verified with their sketches (b-bit MinHash, b = 8) before a
union-find joins them, so chains collapse onto one kept record.

Near duplicates: MinHash over the set of character ``ngram``-grams of the lower-cased,
whitespace-collapsed text (character shingles work for languages written without spaces), split into
``b`` bands of ``r`` values chosen like datasketch does, minimising false positives plus false
negatives around ``threshold`` (128 permutations, threshold 0.85: 8 bands of 16; pairs above Jaccard
0.95 become candidates with probability > 99 %, pairs below 0.7 with < 3 % and are then verified).

    >>> hasher = MinHasher(num_perm=128, ngram=5)
    >>> a = hasher.signature("The quick brown fox jumps over the lazy dog near the river bank today.")
    >>> b = hasher.signature("The quick brown fox jumps over the lazy dog near the river bank, today.")
    >>> round(float((a == b).mean()), 1)
    0.9
    >>> lsh_bands(0.85, 128)
    (8, 16)
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["MinHasher", "lsh_bands", "duplicate_keys", "repeated_keys", "resolve_duplicates", "DuplicateGroups",
           "estimated_jaccard", "KEY_SCHEMA", "DECISION_SCHEMA"]

KEY_SCHEMA = pa.schema([("key", pa.string()), ("seq", pa.int64()), ("id", pa.string()), ("origin", pa.string()),
                        ("sketch", pa.binary())])
DECISION_SCHEMA = pa.schema([("seq", pa.int64()), ("reason", pa.string()), ("detail", pa.string())])

_ID, _EXACT, _NEAR = "i", "e", "n"
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_WHITESPACE = re.compile(r"\s+")
_SHINGLE_BLOCK = 4096
_POLYNOMIAL_BASE = np.uint64(0x100000001B3)


@functools.cache
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising the false positive + false negative probability mass."""
    def area(b: int, r: int, lo: float, hi: float, positive: bool) -> float:
        s = np.linspace(lo, hi, 201)
        p = 1.0 - (1.0 - s ** r) ** b
        return float(np.trapezoid(p if positive else 1.0 - p, s))

    best, best_error = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            error = area(b, r, 0.0, threshold, True) + area(b, r, threshold, 1.0, False)
            if error < best_error:
                best, best_error = (b, r), error
    return best


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads polynomial hashes over all 64 bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class MinHasher:
    """MinHash signatures (``num_perm`` uint32 values) of character n-gram sets; deterministic across processes."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.ngram = ngram
        self._mul = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self._add = rng.integers(0, 2**63, num_perm, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """64-bit hashes of the text's character n-grams (repeats included; MinHash ignores them)."""
        text = _WHITESPACE.sub(" ", text.lower()).strip()
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        n = max(1, min(self.ngram, len(codes)))
        count = max(len(codes) - n + 1, 1)
        hashes = codes[:count].copy()
        for offset in range(1, n):
            hashes *= _POLYNOMIAL_BASE
            hashes += codes[offset:offset + count]
        return _mix64(hashes)

    def signature(self, text: str) -> np.ndarray:
        shingles = self.shingles(text)
        signature = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
        for start in range(0, len(shingles), _SHINGLE_BLOCK):   # bounds memory for long texts
            permuted = (shingles[start:start + _SHINGLE_BLOCK, None] * self._mul + self._add) >> np.uint64(32)
            np.minimum(signature, permuted.min(axis=0), out=signature)
        return signature.astype(np.uint32)


@functools.cache
def _hasher(num_perm: int, ngram: int) -> MinHasher:
    return MinHasher(num_perm, ngram)


def _digest(data: bytes, size: int) -> str:
    return hashlib.blake2b(data, digest_size=size).hexdigest()


def duplicate_keys(batch: pa.Table, *, exact: bool, near: bool, threshold: float, num_perm: int, ngram: int,
                   per_language: bool) -> pa.Table:
    """Key rows (:data:`KEY_SCHEMA`) of a batch with columns ``id, text, lang, seq, origin``.

    ``i|<id>`` (carrying the record's origin), ``e|<lang>|<text hash>`` and ``n<band>|<lang>|<band hash>``
    (carrying the sketch: the low byte of every MinHash value); ``<lang>`` is ``*`` unless ``per_language``.
    """
    bands, rows = lsh_bands(threshold, num_perm)
    hasher = _hasher(num_perm, ngram) if near else None
    keys: list[str] = []
    seqs: list[int] = []
    ids: list[str] = []
    origins: list[str | None] = []
    sketches: list[bytes | None] = []
    for record_id, text, lang, seq, origin in zip(*(batch[c].to_pylist() for c in ("id", "text", "lang", "seq",
                                                                                   "origin"))):
        scope = (lang or "") if per_language else "*"
        record_keys = [f"{_ID}|{record_id}"]
        if exact:
            record_keys.append(f"{_EXACT}|{scope}|{_digest(text.encode('utf-8'), 16)}")
        record_sketches: list[bytes | None] = [None] * len(record_keys)
        if hasher is not None:
            signature = hasher.signature(text)
            record_keys.extend(f"{_NEAR}{band}|{scope}|{_digest(signature[band * rows:(band + 1) * rows].tobytes(), 8)}"
                               for band in range(bands))
            record_sketches.extend([(signature & 0xFF).astype(np.uint8).tobytes()] * bands)
        keys.extend(record_keys)
        seqs.extend([seq] * len(record_keys))
        ids.extend([record_id] * len(record_keys))
        origins.extend([origin] + [None] * (len(record_keys) - 1))
        sketches.extend(record_sketches)
    return pa.table({"key": keys, "seq": seqs, "id": ids, "origin": origins, "sketch": sketches}, schema=KEY_SCHEMA)


def repeated_keys(block: pa.Table) -> pa.Table:
    """Rows of a key-sorted block whose key occurs twice or more in it, or that touch the block's edges.

    Equal keys may straddle two consecutive blocks of a sorted dataset; keeping the rows with the block's
    first and last key lets the driver join such groups (singletons are dropped there).
    """
    n = block.num_rows
    if n == 0:
        return block
    keys = block["key"]
    same_as_previous = np.zeros(n, dtype=bool)
    same_as_previous[1:] = pc.equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy()
    keep = same_as_previous | np.append(same_as_previous[1:], False)
    keep |= pc.equal(keys, keys[0]).to_numpy() | pc.equal(keys, keys[n - 1]).to_numpy()
    return block.filter(pa.array(keep))


@dataclass(frozen=True)
class _Member:
    seq: int
    id: str
    origin: str | None
    sketch: bytes | None


def estimated_jaccard(sketch: bytes, others: list[bytes]) -> np.ndarray:
    """Jaccard similarity of one record to others, estimated from 8-bit MinHash sketches."""
    mine = np.frombuffer(sketch, dtype=np.uint8)
    theirs = np.frombuffer(b"".join(others), dtype=np.uint8).reshape(len(others), len(mine))
    agreement = (theirs == mine).mean(axis=1)
    return np.clip((agreement - 1 / 256) / (1 - 1 / 256), 0.0, 1.0)


class DuplicateGroups:
    """Key groups collected by the driver (memory grows with the number of duplicate candidates only)."""

    def __init__(self) -> None:
        self._groups: dict[str, list[_Member]] = defaultdict(list)

    def add(self, batch: pa.Table) -> None:
        columns = ("key", "seq", "id", "origin", "sketch")
        for key, seq, record_id, origin, sketch in zip(*(batch[c].to_pylist() for c in columns)):
            self._groups[key].append(_Member(seq, record_id, origin, sketch))

    def groups(self, kind: str) -> Iterable[list[_Member]]:
        for key, members in self._groups.items():
            if key.startswith(kind) and len(members) > 1:
                yield sorted(members, key=lambda m: m.seq)


def resolve_duplicates(groups: DuplicateGroups, threshold: float) -> pa.Table:
    """Records to remove (:data:`DECISION_SCHEMA`, sorted by seq): duplicate ids, then exact, then near duplicates.

    In every group the record with the smallest ``seq`` is kept; a record removed by an earlier rule does
    not count in later ones. In a group of near-duplicate candidates, each record is compared with the
    group's *leaders* (earlier records not joined to another leader) and joined to those whose estimated
    Jaccard similarity reaches ``threshold``; records joined through any band form one cluster.
    """
    removed: dict[int, tuple[str, str]] = {}
    for members in groups.groups(_ID):
        kept, *others = members
        for m in others:
            removed[m.seq] = ("duplicate_id", f"field 'id': {m.id!r} is already the id of the record at {kept.origin}")
    for members in groups.groups(_EXACT):
        live = [m for m in members if m.seq not in removed]
        for m in live[1:]:
            removed[m.seq] = ("exact_duplicate", f"field 'text': same text as kept id {live[0].id!r}")

    parent: dict[int, int] = {}
    ids: dict[int, str] = {}

    def find(seq: int) -> int:
        root = seq
        while parent[root] != root:
            root = parent[root]
        while parent[seq] != root:
            parent[seq], seq = root, parent[seq]
        return root

    for members in groups.groups(_NEAR):
        live = [m for m in members if m.seq not in removed]
        for m in live:
            parent.setdefault(m.seq, m.seq)
            ids[m.seq] = m.id
        leaders = live[:1]   # members similar to no earlier leader; later members are compared with these
        for m in live[1:]:
            similar = np.flatnonzero(estimated_jaccard(m.sketch, [lead.sketch for lead in leaders]) >= threshold)
            for index in similar:
                a, b = find(leaders[int(index)].seq), find(m.seq)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if not len(similar):
                leaders.append(m)
    for seq in parent:
        root = find(seq)
        if root != seq:
            removed[seq] = ("near_duplicate", f"field 'text': near-duplicate of kept id {ids[root]!r} "
                                              f"(estimated Jaccard >= {threshold})")

    order = sorted(removed)
    return pa.table({"seq": order, "reason": [removed[s][0] for s in order],
                     "detail": [removed[s][1] for s in order]}, schema=DECISION_SCHEMA)
