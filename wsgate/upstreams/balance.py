"""The balancing methods, as pure functions over candidate servers.

Each takes the servers that may take the connection (available, not tried
yet for this handshake) and functions that read what it needs of them, so
tests call them with plain objects and no clock. :mod:`wsgate.upstreams.pools`
decides which servers are candidates (health, backups, slow start).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, MutableMapping, Sequence
from typing import TypeVar

S = TypeVar("S")

_TWO_64 = float(1 << 64)


def least_conn(candidates: Sequence[S], live: Callable[[S], int],
               weight: Callable[[S], float], turn: int) -> S:
    """The candidate with the fewest live connections per unit of weight; among equals
    the ``turn % n``-th, so that ties go round (*turn* grows by one per choice)."""
    best: list[S] = []
    best_score = math.inf
    for candidate in candidates:
        score = live(candidate) / weight(candidate)
        if score < best_score - 1e-12:
            best, best_score = [candidate], score
        elif score <= best_score + 1e-12:
            best.append(candidate)
    return best[turn % len(best)]


def smooth_weighted(candidates: Sequence[S], key: Callable[[S], str],
                    weight: Callable[[S], float], current: MutableMapping[str, float]) -> S:
    """nginx's smooth weighted round robin: every candidate's *current* grows by its
    weight, the largest is chosen and loses the total. Weights 5, 1, 1 give
    a a b a c a a, not a a a a a b c. *current* (by key) is the pool's state."""
    total = 0.0
    best = None
    best_current = -math.inf
    for candidate in candidates:
        w = weight(candidate)
        value = current.get(key(candidate), 0.0) + w
        current[key(candidate)] = value
        total += w
        if value > best_current:
            best, best_current = candidate, value
    assert best is not None, "smooth_weighted needs at least one candidate"
    current[key(best)] = best_current - total
    return best


def _unit(key_digest: bytes, server: str) -> float:
    """A uniform number in (0, 1) from the pair (*key_digest*, *server*)."""
    digest = hashlib.blake2b(server.encode("utf-8", "surrogatepass") + b"\0" + key_digest,
                             digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 1) / (_TWO_64 + 1)


def rendezvous_order(hash_key: str, servers: Sequence[S], key: Callable[[S], str],
                     weight: Callable[[S], float]) -> list[S]:
    """*servers* in weighted rendezvous (highest random weight) order for *hash_key*.

    The first is the key's server; when it cannot take the key, the next one
    does, the same for every request with this key, so a room's clients
    stay together while its server is down. Adding or removing one server
    of N moves only the keys that server wins or held: about 1/N of them.
    Each score is ``-weight / ln(u)`` (Schindelhauer and Schomaker), so a
    server of weight 2 wins twice as many keys as one of weight 1.

    The key is digested once, so each server's score costs the same however
    long the key is (a header or cookie value is the client's to choose).
    """
    key_digest = hashlib.blake2b(hash_key.encode("utf-8", "surrogatepass"),
                                 digest_size=16).digest()
    scored = sorted(((-weight(s) / math.log(_unit(key_digest, key(s))), key(s), i)
                     for i, s in enumerate(servers)), reverse=True)
    return [servers[i] for _, _, i in scored]
