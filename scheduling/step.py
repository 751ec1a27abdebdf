"""Which ready sequences run together in a decode step, and how to split a prompt list into batches.

Plain ids in, plain ids out: a sequence is a `Candidate` (seq id, arrival stamp, predicted expert
ids per MoE layer); the cache's residents are frozensets of expert ids per layer. This module
does not run models, read routing, predict experts or touch the cache: the engine passes those
in (e.g. the experts a sequence's previous token used) and runs the ids this returns.

Schedulers share one interface (`select(ready, capacity, resident) -> seq ids`, `peek(...)`: the same
choice without counting a step, `forget(seq_id)`):

  fifo    the `capacity` oldest arrivals. With `arrival` stamped when a sequence's next token
          becomes ready (after its previous token ran), this is round-robin.
  expert  ExpertFlow-style token rescheduling: the group whose predicted experts overlap most
          with each other and with the residents, under a bound on consecutive waits.

`group_batches` is the offline twin for `generate(list_of_prompts)`: batches of prompts whose
expert usage overlaps.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol, Sequence

ExpertPath = Sequence[frozenset]            # [L] expert ids per MoE layer


@dataclass
class Candidate:
    """A sequence whose next token is ready. `arrival`: lower = older (ties broken by seq_id).

    `experts[l]`: predicted expert ids of the next token at MoE layer l; None when unknown
    (e.g. a fresh sequence), which the expert-aware scheduler prices at the average cost.
    """
    seq_id: int
    arrival: int
    experts: ExpertPath | None = None


class Scheduler(Protocol):
    name: str

    def select(self, ready: list[Candidate], capacity: int,
               resident: ExpertPath | None = None) -> list[int]:
        """Seq ids to run this step (at most `capacity`), oldest arrival first."""

    def forget(self, seq_id: int) -> None:
        """The sequence finished or was aborted: drop its state."""

    def peek(self, ready: list[Candidate], capacity: int, resident: ExpertPath | None = None) -> list[int]:
        """What `select` would pick from `ready` now, without counting it as a step (no state changes).

        The engine calls it with the sequences passed over this step to guess the next step's group and
        tells the expert cache to keep that group's experts (schedule-aware eviction).
        """


def _age(c: Candidate) -> tuple[int, int]:
    return c.arrival, c.seq_id


def _num_layers(ready: Sequence[Candidate], resident: ExpertPath | None) -> int | None:
    """The layer count shared by every known path and `resident`; ValueError naming the odd one out."""
    counts = {len(c.experts) for c in ready if c.experts is not None}
    if resident is not None:
        counts.add(len(resident))
    if len(counts) > 1:
        raise ValueError(f"expert paths and `resident` must list the same number of MoE layers, got lengths "
                         f"{sorted(counts)}; pass one frozenset per MoE layer for every candidate")
    return counts.pop() if counts else None


def _check(ready: Sequence[Candidate], capacity: int, resident: ExpertPath | None) -> None:
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1 (sequences per step), got {capacity!r}")
    ids = Counter(c.seq_id for c in ready)
    if len(ids) != len(ready):
        twice = sorted(sid for sid, n in ids.items() if n > 1)
        raise ValueError(f"seq ids in `ready` must be unique, got {twice} more than once; list each sequence once "
                         f"per step")
    _num_layers(ready, resident)


def _flat(path: ExpertPath, num_layers: int) -> frozenset[int]:
    """(layer, expert) pairs as one set of ints `layer + num_layers * expert`: one C-level set op per cost.

    int() first: numpy uint8 ids would wrap around in the product.
    """
    return frozenset(layer + num_layers * int(e) for layer, experts in enumerate(path) for e in experts)


def distinct_experts(batch: Sequence[Candidate]) -> int:
    """Sum over layers of the number of distinct predicted experts in `batch` (unknown paths skipped)."""
    _num_layers(batch, None)
    paths = [c.experts for c in batch if c.experts is not None]
    return sum(len(frozenset().union(*layer)) for layer in zip(*paths)) if paths else 0


def misses(batch: Sequence[Candidate], resident: ExpertPath) -> int:
    """Sum over layers of the batch's distinct predicted experts that are not in `resident[l]`."""
    _num_layers(batch, resident)
    paths = [c.experts for c in batch if c.experts is not None]
    return sum(len(frozenset().union(*layer) - res) for *layer, res in zip(*paths, resident)) if paths else 0


class FifoScheduler:
    """The `capacity` oldest arrivals; stateless. The baseline expert-aware scheduling is compared with."""
    name = "fifo"

    def select(self, ready: list[Candidate], capacity: int, resident: ExpertPath | None = None) -> list[int]:
        _check(ready, capacity, resident)
        return [c.seq_id for c in sorted(ready, key=_age)[:capacity]]

    def peek(self, ready: list[Candidate], capacity: int, resident: ExpertPath | None = None) -> list[int]:
        return self.select(ready, capacity, resident)

    def forget(self, seq_id: int) -> None:
        pass


class _Step:
    """The candidates picked so far, the (layer, expert) pairs they need, and marginal costs against them."""

    def __init__(self, flats: dict[int, frozenset[int] | None], resident: frozenset[int] | None, miss_weight: float):
        self.flats, self.resident, self.miss_weight = flats, resident, miss_weight
        known = [flat for flat in flats.values() if flat is not None]
        # nothing to save (no known path, or every predicted expert resident): pick as FIFO does, at FIFO's cost
        self.by_age = not known or (resident is not None and all(flat <= resident for flat in known))
        shared = Counter() if self.by_age else Counter(p for flat in known for p in flat)
        self.popularity = {sid: sum(shared[p] for p in flat) - len(flat) for sid, flat in flats.items() if flat}
        self.union: set[int] = set()
        self.picked: list[Candidate] = []
        self.ids: set[int] = set()

    def cost(self, flat: frozenset[int]) -> float:
        new = flat - self.union
        if self.resident is None:
            return float(len(new))
        miss = len(new - self.resident)
        return len(new) - miss + self.miss_weight * miss

    def cheapest(self, pool: list[Candidate]) -> Candidate:
        """Lowest marginal cost (unknown paths: the mean of the known ones); ties: experts most shared with
        the other ready sequences, then oldest. Oldest first when there is nothing to save (`by_age`)."""
        if self.by_age:
            return min(pool, key=_age)
        costs = {c.seq_id: self.cost(self.flats[c.seq_id]) for c in pool if self.flats[c.seq_id] is not None}
        unknown = sum(costs.values()) / len(costs) if costs else 0.0
        return min(pool, key=lambda c: (costs.get(c.seq_id, unknown), -self.popularity.get(c.seq_id, 0), *_age(c)))

    def rest(self, pool: list[Candidate]) -> list[Candidate]:
        return [c for c in pool if c.seq_id not in self.ids]

    def take(self, c: Candidate) -> None:
        self.picked.append(c)
        self.ids.add(c.seq_id)
        self.union |= self.flats[c.seq_id] or frozenset()


class ExpertAwareScheduler:
    """Run together the ready sequences whose predicted experts overlap; nobody waits over `max_wait` steps.

    One step, capacity 2, one layer shown, residents {1, 2}, w = miss_weight:

        ready  path    waited           1. must run: s4 is at the bound          union {3, 9}
        s1     {1, 2}  0                2. greedy, cheapest marginal cost:
        s2     {1, 3}  0                     s1 adds {1, 2}, both resident      cost 2
        s3     {7, 8}  1                     s2 adds {1}, resident              cost 1   <- s2
        s4     {3, 9}  4 = max_wait          s3 adds {7, 8}, both missing       cost 2w
                                        step = [s2, s4]; s1, s3 wait (counters 1, 2)

        cost(c) = sum over layers of |new resident experts| + w * |new non-resident experts|

    Must-run set: sequences at the bound, plus, when otherwise more sequences than slots would reach the
    bound together in a later step, enough of the nearest-to-bound ones (an earliest-deadline feasibility
    reserve, chosen greedily by cost too). This keeps every wait <= max_wait whenever the unfinished
    sequences (ready or not) number at most capacity * (max_wait + 1); above that no schedule can, and the
    longest-waiting (then oldest) run first. So choose max_wait >= ceil(max_num_seqs / capacity) - 1.

    When no candidate's path is known, or every predicted expert is resident, there are no loads to save and
    the pick is FIFO's (oldest first, after the must-runs), at FIFO's cost. Unknown paths (None) are otherwise
    priced at the mean cost of the known candidates. Ties go to the candidate
    whose experts the other ready sequences share most (with nothing resident, the first pick seeds the
    largest overlapping group), then to the older arrival. When len(ready) <= capacity everyone runs.
    A counter resets when its sequence runs and stands still while it is not ready, so call
    forget(seq_id) when a sequence finishes or is aborted, or it keeps holding a reserve.
    """
    name = "expert"

    def __init__(self, max_wait: int = 4, miss_weight: float = 2.0):
        if not isinstance(max_wait, int) or max_wait < 0:
            raise ValueError(f"max_wait must be an int >= 0 (steps a ready sequence may be passed over), "
                             f"got {max_wait!r}")
        if not miss_weight > 0:
            raise ValueError(f"miss_weight must be > 0 (cost of a non-resident expert relative to a resident "
                             f"one; 1 ignores residency), got {miss_weight!r}")
        self.max_wait, self.miss_weight = max_wait, float(miss_weight)
        self._waits: dict[int, int] = {}

    @property
    def waits(self) -> dict[int, int]:
        """Consecutive steps each passed-over sequence has waited (sequences at 0 are absent)."""
        return dict(self._waits)

    def select(self, ready: list[Candidate], capacity: int, resident: ExpertPath | None = None) -> list[int]:
        chosen = self.peek(ready, capacity, resident)
        picked = set(chosen)
        for c in ready:
            if c.seq_id in picked:
                self._waits.pop(c.seq_id, None)
            else:
                self._waits[c.seq_id] = self._waits.get(c.seq_id, 0) + 1
        return chosen

    def peek(self, ready: list[Candidate], capacity: int, resident: ExpertPath | None = None) -> list[int]:
        _check(ready, capacity, resident)
        chosen = list(ready) if len(ready) <= capacity else self._choose(ready, capacity, resident)
        return [c.seq_id for c in sorted(chosen, key=_age)]

    def forget(self, seq_id: int) -> None:
        self._waits.pop(seq_id, None)

    def _slack(self, c: Candidate) -> int:
        return self.max_wait - self._waits.get(c.seq_id, 0)

    def _choose(self, ready: list[Candidate], capacity: int, resident: ExpertPath | None) -> list[Candidate]:
        layers = _num_layers(ready, resident)
        flats = {c.seq_id: None if c.experts is None else _flat(c.experts, layers) for c in ready}
        step = _Step(flats, None if resident is None else _flat(resident, layers), self.miss_weight)
        for m, pool, need in self._reserve(ready, capacity):
            for _ in range(need - sum(c.seq_id in step.ids for c in pool)):
                rest = step.rest(pool)
                step.take(rest[0] if m == 0 else step.cheapest(rest))
        while len(step.picked) < capacity:
            step.take(step.cheapest(step.rest(ready)))
        return step.picked

    def _reserve(self, ready: list[Candidate], capacity: int):
        """(m, pool, need): at least `need` picks must come from `pool`, the ready sequences with slack <= m.

        Slack = max_wait - waited. After this step, sequences left with slack <= m - 1 (pool's unpicked,
        and counted sequences that are not ready now, whose counters stand still) must fit the
        capacity * m slots of the next m steps; slack 0 must run now. Pools are nested and sorted by
        slack then age, so meeting every level takes at most `capacity` picks.
        """
        ids = {c.seq_id for c in ready}
        absent = [self.max_wait - w for sid, w in self._waits.items() if sid not in ids]
        urgent = sorted(ready, key=lambda c: (self._slack(c), *_age(c)))
        for m in range(self.max_wait + 1):
            pool = [c for c in urgent if self._slack(c) <= m]
            held = sum(slack <= m - 1 for slack in absent)
            need = min(capacity, len(pool), len(pool) + held - capacity * m)
            if need > 0:
                yield m, pool, need


SCHEDULERS = {"fifo": FifoScheduler, "expert": ExpertAwareScheduler}


def make_scheduler(name: str, **kw) -> Scheduler:
    """A scheduler by registered name ("fifo", "expert") with its options, e.g. make_scheduler("expert", max_wait=4)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(sorted(SCHEDULERS))}")
    try:
        return SCHEDULERS[name](**kw)
    except TypeError as e:
        raise ValueError(f"scheduler {name!r} does not accept options {sorted(kw)} ({e})") from None


def group_batches(paths: Sequence[ExpertPath], batch_size: int) -> list[list[int]]:
    """Split prompts into batches of at most `batch_size` whose expert usage overlaps; indices into `paths`.

    paths[i][l]: expert ids prompt i uses (or is predicted to use) at MoE layer l. Greedy: seed each
    batch with the remaining prompt of largest usage, then add the prompt adding the fewest new
    (layer, expert) pairs to the batch's union (ties: larger overlap, then lower index). Every index
    appears exactly once; batches come out in the order they were built.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    layers = _num_layers([Candidate(i, i, p) for i, p in enumerate(paths)], None) or 0
    flats = [_flat(p, layers) for p in paths]
    remaining = sorted(range(len(paths)), key=lambda i: (-len(flats[i]), i))
    batches = []
    while remaining:
        batch = [remaining.pop(0)]
        union = set(flats[batch[0]])
        while remaining and len(batch) < batch_size:
            best = min(remaining, key=lambda i: (len(flats[i] - union), -len(flats[i] & union), i))
            remaining.remove(best)
            batch.append(best)
            union |= flats[best]
        batches.append(batch)
    return batches
