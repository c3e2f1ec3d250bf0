"""Weighted rendezvous hashing: which members of a placed store hold a chunk.

Every member gets a score for each chunk key, ``-weight / ln(u)``, where
``u`` is a hash of the member's id and the key, mapped into (0, 1). The
members with the highest scores are the chunk's placement. This is highest random
weight (rendezvous) hashing with logarithmic weights: ``-ln(u) / weight``
is exponentially distributed with rate ``weight``, and of several
independent exponential variables the smallest is member i's with
probability ``weight_i / sum(weights)``. It has three properties that the
placed store relies on:

- Placement is a pure function of the member ids, the weights and the key,
  so every host computes the same placement without talking to the others.
- A member is first for a share of keys proportional to its weight.
- Adding a member changes a key's placement only by inserting the new
  member into it, which happens for about R/n of the keys; removing a member
  changes only the keys it held. No other key moves.

The hash is BLAKE2b, so placement does not depend on the Python version,
the platform or ``PYTHONHASHSEED``.
"""

import hashlib
import math
from collections.abc import Sequence

# Bits of the hash that make ``u``: a double holds 53, and the 0.5 added
# in `unit_from_hash` needs one more bit below the 52 used.
_UNIT_BITS = 52


def unit_hash(member_id: str, key: str) -> float:
    """Return a hash of *member_id* and *key* in the open interval (0, 1)."""
    return _unit_hash(_hash_key(member_id), key.encode())


def member_score(member_id: str, weight: float, key: str) -> float:
    """Return the rendezvous score of one member for *key*; higher wins.

    A member of weight 0 scores 0 and so comes after every member of
    positive weight, for every key.
    """
    return _score(_hash_key(member_id), weight, key.encode())


class Placement:
    """The ranking of a fixed list of members for any key.

    Members are given by id and weight. Ids must be distinct, because two
    members with one id would score the same for every key. Weights are
    finite and not negative, and at least *replicas* of them are positive.
    """

    def __init__(self, ids: Sequence[str], weights: Sequence[float], replicas: int):
        if len(ids) != len(weights):
            raise ValueError("expected one weight per member id")
        if len(set(ids)) != len(ids):
            raise ValueError("member ids must be distinct")
        for weight in weights:
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"invalid weight {weight!r}: expected a finite number >= 0")
        positive = sum(weight > 0 for weight in weights)
        if replicas < 1:
            raise ValueError(f"invalid replicas {replicas}: expected at least 1")
        if replicas > positive:
            raise ValueError(
                f"{replicas} replicas need at least {replicas} members of "
                f"positive weight, and there are {positive}"
            )
        self.ids = tuple(ids)
        self.weights = tuple(float(weight) for weight in weights)
        self.replicas = replicas
        # The key argument of BLAKE2b takes at most 64 bytes, so a longer id
        # is first hashed down to 64 bytes.
        self._hash_keys = tuple(_hash_key(member_id) for member_id in self.ids)

    def rank(self, key: str) -> list[int]:
        """Return the indexes of all members, best first, for *key*.

        The first `replicas` of them are the key's placement; the rest are
        the order in which a reader looks further when those fail.
        """
        data = key.encode()
        scores = []
        for index, (hash_key, weight) in enumerate(zip(self._hash_keys, self.weights)):
            scores.append((-_score(hash_key, weight, data), self.ids[index], index))
        scores.sort()
        return [index for _, _, index in scores]

    def place(self, key: str) -> list[int]:
        """Return the indexes of the members that make up the placement of *key*, best first."""
        return self.rank(key)[: self.replicas]


def _hash_key(member_id: str) -> bytes:
    raw = member_id.encode()
    if len(raw) <= 64:
        return raw
    return hashlib.blake2b(raw, digest_size=64).digest()


def unit_from_hash(value: int) -> float:
    """Map a 64-bit hash *value* into the open interval (0, 1).

    Adding one half keeps the result away from 0 and 1, where ln(u) is
    -inf or 0, and the result is exact because it fits a double.
    """
    return ((value >> (64 - _UNIT_BITS)) + 0.5) / (1 << _UNIT_BITS)


def _unit_hash(hash_key: bytes, data: bytes) -> float:
    digest = hashlib.blake2b(data, digest_size=8, person=b"shardfs-place", key=hash_key).digest()
    return unit_from_hash(int.from_bytes(digest, "big"))


def _score(hash_key: bytes, weight: float, data: bytes) -> float:
    if weight == 0:
        return 0.0
    return -weight / math.log(_unit_hash(hash_key, data))
