"""The bi-level evolutionary search over balanced partitions (DESIGN.md 3.3).

Outer level: a small population of partitions, seeded by constructions from link clustering
(``construct``) and random partitions; offspring by crossover (keep a run of one parent's
pipeline, fill the rest from the other parent's groups) or mutation (random swaps), each then
improved by local search; the best survive, duplicates are dropped. Inner level: every
candidate is scored exactly (bottleneck matchings per group pair + open-loop TSP, see
``problem``).

Local search swaps two devices of different groups. A swap only changes two groups, so only
their DP sums (two columns of an N x P table) and their 2 (P - 1) pair costs are recomputed;
swaps between interchangeable devices (same equivalence class) are skipped. Moves are accepted
on the surrogate score, which sees progress on the plateaus of the bottleneck objective.

Deterministic for a seed: all randomness comes from one ``numpy.random.Generator``, and the
search stops by its own convergence rule (``patience`` generations without improvement, or a
cap on evaluations) unless the time budget runs out first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from swarm.clock import Clock, SystemClock
from swarm.scheduling import construct
from swarm.scheduling.problem import Problem
from swarm.scheduling.tsp import open_path

log = logging.getLogger(__name__)

_EPS = 1e-9


class Budget:
    """Stops the search at a deadline (injected clock) or after ``max_evals`` move evaluations."""

    def __init__(self, clock: Clock, time_budget_s: float, max_evals: int) -> None:
        self.clock = clock
        self.deadline = clock.monotonic() + time_budget_s
        self.max_evals = max_evals
        self.evals = 0
        self._checks = 0
        self._late = False

    def spent(self) -> bool:
        if self._late or self.evals >= self.max_evals:
            return True
        self._checks += 1
        if self.clock.monotonic() >= self.deadline:
            self._late = True
        return self._late

    @property
    def timed_out(self) -> bool:
        return self._late


@dataclass(slots=True)
class State:
    members: np.ndarray  # (P, D) device indices
    sdel: np.ndarray  # (N, P)
    sinv: np.ndarray  # (N, P)
    b: np.ndarray  # (P, P) bottleneck pair costs
    s: np.ndarray  # (P, P) soft pair costs
    comp: float
    dp: np.ndarray
    pen: float
    true: float
    surr: float

    def groups(self) -> list[list[int]]:
        return self.members.tolist()


def make_state(prob: Problem, groups: list[list[int]]) -> State:
    members = np.asarray(groups, dtype=np.int64)
    sdel, sinv = prob.sums(members)
    comp, dp, _, pen = prob.group_terms(members, sdel, sinv)
    b, s = prob.pair_matrices(members.tolist())
    true, surr = prob.combine(comp, dp, b, s, pen)
    return State(members, sdel, sinv, b, s, comp, dp, pen, true, surr)


def try_swap(prob: Problem, st: State, g1: int, i1: int, g2: int, i2: int) -> State | None:
    """The state after swapping members[g1][i1] and members[g2][i2] if its surrogate is lower."""
    d1 = int(st.members[g1, i1])
    d2 = int(st.members[g2, i2])
    mem = st.members.copy()
    mem[g1, i1] = d2
    mem[g2, i2] = d1
    sdel = st.sdel.copy()
    sinv = st.sinv.copy()
    delta0 = prob.a0[:, d2] - prob.a0[:, d1]
    delta1 = prob.a1[:, d2] - prob.a1[:, d1]
    sdel[:, g1] += delta0
    sdel[:, g2] -= delta0
    sinv[:, g1] += delta1
    sinv[:, g2] -= delta1
    comp, dp, _, pen = prob.group_terms(mem, sdel, sinv)
    b = st.b.copy()
    s = st.s.copy()
    p = prob.p
    rows = [mem[g].tolist() for g in range(p)]
    for g in (g1, g2):
        for h in range(p):
            if h == g or (g == g2 and h == g1 and prob.symmetric):
                continue
            b[g, h], s[g, h] = prob.pair(rows[g], rows[h])
            if prob.symmetric:
                b[h, g], s[h, g] = b[g, h], s[g, h]
            else:
                b[h, g], s[h, g] = prob.pair(rows[h], rows[g])
    base = comp + float(dp.max()) + pen
    pp_soft, _ = open_path(s)
    from swarm.scheduling.problem import LAMBDA_DP

    surr = base + LAMBDA_DP * float(dp.mean()) + 2.0 * pp_soft
    if surr >= st.surr - _EPS * max(1.0, abs(st.surr)):
        return None
    pp_true, _ = open_path(b)
    return State(mem, sdel, sinv, b, s, comp, dp, pen, base + 2.0 * pp_true, surr)


def _class_slots(cls_row: np.ndarray) -> dict[int, int]:
    """First slot of each class present in a group."""
    out: dict[int, int] = {}
    for i, c in enumerate(cls_row.tolist()):
        out.setdefault(c, i)
    return out


def local_search(prob: Problem, st: State, rng: np.random.Generator, budget: Budget, max_moves: int = 4000) -> State:
    """First-improvement swap descent on the surrogate until no swap helps (or budget)."""
    p = prob.p
    cls = prob.classes
    while not budget.spent():
        cand: list[tuple[int, int, int, int]] = []
        for g1 in range(p):
            s1 = _class_slots(cls[st.members[g1]])
            for g2 in range(g1 + 1, p):
                s2 = _class_slots(cls[st.members[g2]])
                for c1, i1 in s1.items():
                    for c2, i2 in s2.items():
                        if c1 != c2:
                            cand.append((g1, i1, g2, i2))
        if not cand:
            return st
        if len(cand) > max_moves:
            idx = rng.choice(len(cand), size=max_moves, replace=False)
            cand = [cand[k] for k in idx]
        else:
            cand = [cand[k] for k in rng.permutation(len(cand))]
        improved = False
        touched: set[int] = set()
        for g1, i1, g2, i2 in cand:
            if g1 in touched or g2 in touched:
                continue  # slots of changed groups are stale: next pass
            if budget.spent():
                break
            budget.evals += 1
            new = try_swap(prob, st, g1, i1, g2, i2)
            if new is not None:
                st = new
                improved = True
                touched.update((g1, g2))
        if not improved:
            break
    return st


def path_order(st: State) -> list[int]:
    return open_path(st.b)[1]


def crossover(prob: Problem, a: State, b: State, rng: np.random.Generator) -> list[list[int]]:
    """Keep a run of ``a``'s groups in pipeline order; the rest follows ``b``'s grouping."""
    p, d = prob.p, prob.d
    order = path_order(a)
    k = int(rng.integers(1, p))
    start = int(rng.integers(0, p - k + 1))
    kept = [a.members[g].tolist() for g in order[start : start + k]]
    used = {x for g in kept for x in g}
    seq = [x for g in path_order(b) for x in b.members[g].tolist() if x not in used]
    rest = [seq[i * d : (i + 1) * d] for i in range(p - k)]
    return kept + rest


def mutate(prob: Problem, st: State, rng: np.random.Generator, swaps: int) -> list[list[int]]:
    groups = st.groups()
    for _ in range(swaps):
        g1, g2 = rng.choice(prob.p, size=2, replace=False)
        i1, i2 = rng.integers(0, prob.d, size=2)
        groups[g1][i1], groups[g2][i2] = groups[g2][i2], groups[g1][i1]
    return groups


def _key(prob: Problem, st: State) -> tuple:
    return tuple(sorted(tuple(sorted(prob.classes[row].tolist())) for row in st.members))


@dataclass(frozen=True, slots=True)
class SearchResult:
    groups: list[list[int]]
    true: float
    evals: int
    generations: int
    timed_out: bool


def search(
    prob: Problem,
    *,
    seed: int,
    time_budget_s: float,
    clock: Clock | None = None,
    population: int = 8,
    patience: int = 25,
    max_evals: int = 2_000_000,
    max_generations: int = 400,
) -> SearchResult:
    """Best partition found (lowest true score)."""
    rng = np.random.default_rng(seed)
    budget = Budget(clock or SystemClock(), time_budget_s, max_evals)
    if prob.p == 1 or prob.d == 1 and prob.p <= 2:
        groups = [list(range(prob.n))] if prob.p == 1 else [[x] for x in range(prob.n)]
        st = make_state(prob, groups)
        return SearchResult(st.groups(), st.true, 0, 0, False)

    starts = construct.constructions(prob)
    states = []
    seen: set[tuple] = set()
    for g in starts:
        st = make_state(prob, g)
        k = _key(prob, st)
        if k not in seen:
            seen.add(k)
            states.append(st)
    states.sort(key=lambda s: (s.true, s.surr))
    pool = states[: max(1, population - 2)]
    for _ in range(population - len(pool)):
        pool.append(make_state(prob, construct.random_partition(prob, rng)))
    pool = [local_search(prob, st, rng, budget) for st in pool]
    best = min(pool, key=lambda s: s.true)
    log.debug("search initial best=%.6f evals=%d", best.true, budget.evals)

    gens = 0
    stale = 0
    while not budget.spent() and stale < patience and gens < max_generations:
        gens += 1
        i, j = rng.choice(len(pool), size=2, replace=False)
        pa = pool[i] if pool[i].surr <= pool[j].surr else pool[j]
        if rng.random() < 0.5 and len(pool) > 1:
            other = pool[int(rng.integers(0, len(pool)))]
            child_groups = crossover(prob, pa, other, rng)
        else:
            child_groups = mutate(prob, pa, rng, int(rng.integers(1, max(2, prob.p) + 1)))
        child = local_search(prob, make_state(prob, child_groups), rng, budget)
        if child.true < best.true - 1e-12:
            best = child
            stale = 0
        else:
            stale += 1
        keys = {_key(prob, s) for s in pool}
        ck = _key(prob, child)
        worst = max(range(len(pool)), key=lambda k: (pool[k].surr, k))
        if ck not in keys and child.surr < pool[worst].surr:
            pool[worst] = child
    log.debug("search done best=%.6f evals=%d gens=%d timed_out=%s", best.true, budget.evals, gens, budget.timed_out)
    return SearchResult(best.groups(), best.true, budget.evals, gens, budget.timed_out)
