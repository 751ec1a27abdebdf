"""Sharing a serving engine's steps among clients: who is admitted, who yields, how much prefill each step takes.

Plain ids in, plain ids out (never imports moe_engine); the engine's Batcher (runtime/batching.py) applies these:

    fair_order      clients take turns: the waiting sequence admitted next, the prompt chunked next
    over_cap        the sequences a client runs beyond its seat cap while other clients want seats (preempted
                    newest-first, recomputed later) or rows (left out of a decode step)
    rows_per_client at most `cap` rows per client in one decode step while other clients have rows ready
    chunk_sizes     a step's prefill token budget split over the prompts being prefilled (water-filling)
    cold_forced     per candidate, the non-resident experts only it is predicted to need this step
    PhaseGate       fair interleaving of prefill and decode: while sequences decode, prefill forwards take at most
                    `share` of the engine's time

Nothing here changes what a sequence computes, only when: outputs never depend on these choices.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

from .step import Candidate, ExpertPath, _flat, _num_layers


def fair_order(items: Sequence[tuple[int, Hashable]], offset: Mapping[Hashable, float] | None = None,
               priority: Mapping[Hashable, float] | None = None) -> list[int]:
    """Keys of `items` ((key, client) in queue order) with clients taking turns.

    A client's k-th item ranks offset[client] + k (a client that already runs more sequences waits longer for its
    next one); ties go to the client of lower `priority` (e.g. prefill tokens served), then to the earlier item.
    One client: queue order.
    """
    offset, priority = offset or {}, priority or {}
    seen: Counter = Counter()
    ranked = []
    for pos, (key, client) in enumerate(items):
        ranked.append((offset.get(client, 0) + seen[client], priority.get(client, 0), pos, key))
        seen[client] += 1
    return [r[-1] for r in sorted(ranked)]


def over_cap(running: Sequence[tuple[int, Hashable, int]], cap: int) -> list[int]:
    """Keys of the sequences clients run beyond `cap`, the best to give up first.

    running: (key, client, progress) with progress = tokens computed so far. From the client running the most,
    its sequence with the least progress (the cheapest to recompute; ties: the later one), one at a time, so the
    clients above the cap come down evenly.
    """
    by_client: dict[Hashable, list[tuple[int, int, int]]] = {}
    for pos, (key, client, progress) in enumerate(running):
        by_client.setdefault(client, []).append((progress, -pos, key))
    for items in by_client.values():
        items.sort(reverse=True)                        # most progress first: the list's tail is given up first
    out = []
    while True:
        client = max(by_client, key=lambda c: len(by_client[c]), default=None)
        if client is None or len(by_client[client]) <= cap:
            return out
        out.append(by_client[client].pop()[-1])


def rows_per_client(ready: Sequence[tuple[int, Hashable]], cap: int) -> list[int]:
    """Keys of `ready` ((key, client), oldest first) a decode step may run: every one when a single client has
    rows ready, else each client's `cap` oldest (a client with many sequences does not slow the others' steps)."""
    if len({client for _, client in ready}) <= 1:
        return [key for key, _ in ready]
    seen: Counter = Counter()
    out = []
    for key, client in ready:
        if seen[client] < cap:
            out.append(key)
        seen[client] += 1
    return out


def chunk_sizes(remaining: Sequence[int], budget: int) -> list[int]:
    """Ids each prompt feeds this step: at most `budget` in all, in equal shares (water-filling: a prompt that needs
    less than its share leaves the rest to the others; rows of equal length keep a padded batch dense). The
    rounding remainder goes to the earlier rows; a row may get 0 when the budget has fewer ids than rows."""
    if budget < 0 or any(r < 0 for r in remaining):
        raise ValueError(f"budget and remaining must be >= 0, got {budget} and {list(remaining)}")
    out = [0] * len(remaining)
    left = budget
    order = sorted(range(len(remaining)), key=lambda i: (remaining[i], i))
    for k, i in enumerate(order):
        level = left // (len(order) - k)
        if remaining[i] > level:                  # this row and every longer one get the level, earlier rows +1
            rest = sorted(order[k:])
            extra = left - level * len(rest)
            for pos, j in enumerate(rest):
                out[j] = level + (pos < extra)
            return out
        out[i] = remaining[i]
        left -= remaining[i]
    return out


def cold_forced(ready: Sequence[Candidate], resident: ExpertPath) -> dict[int, int]:
    """Per candidate with a known path: its predicted (layer, expert) pairs that are not resident and that no other
    ready candidate is predicted to use, i.e. the loads it alone would force if it ran this step."""
    layers = _num_layers(ready, resident)
    if layers is None:
        return {}
    flats = {c.seq_id: _flat(c.experts, layers) for c in ready if c.experts is not None}
    res = _flat(resident, layers)
    shared = Counter(p for flat in flats.values() for p in flat)
    return {sid: sum(1 for p in flat if shared[p] == 1 and p not in res) for sid, flat in flats.items()}


class PhaseGate:
    """Fair interleaving of prefill and decode: while sequences decode, prefill takes at most `share` of the time.

    A prefill forward that ran while sequences were decoding adds its time x (1 - share) to a debt; decode steps pay
    it back at their time x share; prefill may run again once the debt is paid. With share 0.5 a 0.3 s prompt chunk
    is followed by 0.3 s of decode steps before the next chunk. No credit is banked (the debt never goes below 0),
    with nobody decoding prefill always runs and its debt is forgiven. share None: no gate (prefill whenever the
    token budget allows).
    """

    def __init__(self, share: float | None):
        if share is not None and not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1] (the fraction of time prefill may take while sequences "
                             f"decode) or None, got {share!r}")
        self.share = share
        self.debt = 0.0

    def allows(self, decoding: bool) -> bool:
        return self.share is None or not decoding or self.debt <= 0.0

    def prefilled(self, seconds: float, decoding: bool) -> None:
        """A prefill forward took `seconds`; decoding: sequences were waiting to decode meanwhile (else nobody was
        held back, and the debt is forgiven)."""
        if self.share is not None:
            self.debt = self.debt + seconds * (1.0 - self.share) if decoding else 0.0

    def decoded(self, seconds: float) -> None:
        if self.share is not None:
            self.debt = max(0.0, self.debt - seconds * self.share)
