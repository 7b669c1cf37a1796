"""The bi-level evolutionary search over balanced partitions (DESIGN.md 3.3).

Outer level: a small population of partitions, seeded by constructions from link clustering
(``construct``) and random partitions; offspring by crossover (keep a run of one parent's
pipeline, fill the rest from the other parent's groups) or mutation (random swaps), each then
improved by local search; the best survive, duplicates are dropped. Inner level: every
candidate is scored exactly (bottleneck matchings per group pair + open-loop TSP, see
``problem``).

Local search swaps two devices of different groups. A swap only changes two groups, so only
their DP sums (two columns of an N x P table) and their 2 (P - 1) pair costs are recomputed,
and two bounds reject most swaps before any matching or TSP solve; swaps between look-alike
devices (same class up to 2% link noise) are skipped. Moves are accepted on the surrogate
score, which sees progress on the plateaus of the bottleneck objective. The best partition is
finally polished by a descent on the exact objective. Instances with few partitions are
enumerated instead.

Deterministic for a seed: all randomness comes from one ``numpy.random.Generator``, and the
search stops by its own convergence rule (``patience`` generations without improvement, or a
cap on evaluations) unless the time budget runs out first.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np

from swarm.clock import Clock, SystemClock
from swarm.scheduling import construct
from swarm.scheduling.problem import LAMBDA_DP, Problem
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
    keys: list[bytes]  # per group: its multiset of equivalence classes
    pp_soft: float  # open-path cost over s

    def groups(self) -> list[list[int]]:
        return self.members.tolist()


def make_state(prob: Problem, groups: list[list[int]]) -> State:
    members = np.asarray(groups, dtype=np.int64)
    sdel, sinv = prob.sums(members)
    comp, dp, _, pen = prob.group_terms(members, sdel, sinv)
    b, s = prob.pair_matrices(members)
    true, surr = prob.combine(comp, dp, b, s, pen)
    pp_soft = prob.path_cost(s)
    return State(members, sdel, sinv, b, s, comp, dp, pen, true, surr, [prob.key(m) for m in members], pp_soft)


def try_swap(prob: Problem, st: State, g1: int, i1: int, g2: int, i2: int, *, exact: bool = False) -> State | None:
    """The state after swapping members[g1][i1] and members[g2][i2] if it scores lower.

    Scores compare by the surrogate, or by the true objective when ``exact``.
    """
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
    base = comp + float(dp.max()) + pen
    if exact:
        cur, cur_pp, cur_mat, head = st.true, st.true - (st.comp + float(st.dp.max()) + st.pen), st.b, base
        cur_pp *= 0.5
    else:
        cur, cur_pp, cur_mat, head = st.surr, st.pp_soft, st.s, base + LAMBDA_DP * float(dp.mean())
    tol = _EPS * max(1.0, abs(cur))
    p = prob.p
    # Before any matching: a pair costs at least max(max row-min, max col-min) of its
    # submatrix. A path uses at most one edge into and one out of each group, and only edges
    # at g1 or g2 change, so the new best path is at least the old one minus their savings.
    if head + 2.0 * (cur_pp - _saving_bound(prob, cur_mat, mem, g1, g2)) >= cur - tol:
        return None
    b = st.b.copy()
    s = st.s.copy()
    keys = list(st.keys)
    keys[g1] = prob.key(mem[g1])
    keys[g2] = prob.key(mem[g2])
    for g in (g1, g2):
        for h in range(p):
            if h == g or (g == g2 and h == g1 and prob.symmetric):
                continue
            b[g, h], s[g, h] = prob.pair(mem[g], mem[h], keys[g], keys[h])
            if prob.symmetric:
                b[h, g], s[h, g] = b[g, h], s[g, h]
            else:
                b[h, g], s[h, g] = prob.pair(mem[h], mem[g], keys[h], keys[g])
    new_mat = b if exact else s
    dec = np.maximum(cur_mat - new_mat, 0.0)
    saving = dec[g1].max() + dec[:, g1].max() + dec[g2].max() + dec[:, g2].max()
    if head + 2.0 * (cur_pp - saving) >= cur - tol:
        return None
    path = prob.path_cost(new_mat)
    if head + 2.0 * path >= cur - tol:
        return None
    pp_true = path if exact else prob.path_cost(b)
    pp_soft = prob.path_cost(s) if exact else path
    surr = base + LAMBDA_DP * float(dp.mean()) + 2.0 * pp_soft
    return State(mem, sdel, sinv, b, s, comp, dp, pen, base + 2.0 * pp_true, surr, keys, pp_soft)


def _saving_bound(prob: Problem, cur: np.ndarray, mem: np.ndarray, g1: int, g2: int) -> float:
    """Upper bound on how much the open path over pair costs ``cur`` can shrink when g1, g2 change."""
    d, p = prob.d, prob.p
    flat = mem.ravel()
    pair = (g1, g2)
    out = prob.w[mem[[g1, g2]].ravel()][:, flat].reshape(2, d, p, d)  # [k, i, h, j] = w[g_k,i, h_j]
    lb_out = np.maximum(out.min(axis=3).max(axis=1), out.min(axis=1).max(axis=2))  # (2, P)
    if prob.symmetric:
        lb_in = lb_out
    else:
        inc = prob.w[flat][:, mem[[g1, g2]].ravel()].reshape(p, d, 2, d)  # [h, i, k, j] = w[h_i, g_k,j]
        lb_in = np.maximum(inc.min(axis=3).max(axis=1), inc.min(axis=1).max(axis=2)).T  # (2, P)
    dec_out = np.maximum(cur[pair, :] - lb_out, 0.0)
    dec_in = np.maximum(cur[:, pair].T - lb_in, 0.0)
    dec_out[0, g1] = dec_out[1, g2] = dec_in[0, g1] = dec_in[1, g2] = 0.0
    return float(dec_out.max(axis=1).sum() + dec_in.max(axis=1).sum())


def _class_slots(cls_row: np.ndarray) -> dict[int, int]:
    """First slot of each class present in a group."""
    out: dict[int, int] = {}
    for i, c in enumerate(cls_row.tolist()):
        out.setdefault(c, i)
    return out


def local_search(
    prob: Problem,
    st: State,
    rng: np.random.Generator,
    budget: Budget,
    *,
    active: set[int] | None = None,
    max_moves: int = 4000,
    max_evals: int = 20_000,
    exact: bool = False,
) -> State:
    """First-improvement swap descent on the surrogate until no swap helps (or budget).

    ``active``: only swaps touching these groups are tried in the first pass; later passes
    try swaps touching the groups changed in the pass before ("don't look bits"). None: all.
    """
    p = prob.p
    cls = prob.move_classes
    start_evals = budget.evals
    # first pass after a perturbation: only swaps among the groups it touched (repair);
    # later passes: swaps touching any group changed by the pass before
    both = active is not None
    active = set(range(p)) if active is None else set(active)
    while active and not budget.spent() and budget.evals - start_evals < max_evals:
        slots = [_class_slots(cls[st.members[g]]) for g in range(p)]
        cand: list[tuple[int, int, int, int]] = []
        for g1 in range(p):
            for g2 in range(g1 + 1, p):
                if (g1 not in active or g2 not in active) if both else (g1 not in active and g2 not in active):
                    continue
                for c1, i1 in slots[g1].items():
                    for c2, i2 in slots[g2].items():
                        if c1 != c2:
                            cand.append((g1, i1, g2, i2))
        if not cand:
            return st
        if len(cand) > max_moves:
            idx = rng.choice(len(cand), size=max_moves, replace=False)
            cand = [cand[k] for k in idx]
        else:
            cand = [cand[k] for k in rng.permutation(len(cand))]
        touched: set[int] = set()
        for g1, i1, g2, i2 in cand:
            if g1 in touched or g2 in touched:
                continue  # slots of changed groups are stale: next pass
            if budget.spent() or budget.evals - start_evals >= max_evals:
                break
            budget.evals += 1
            new = try_swap(prob, st, g1, i1, g2, i2, exact=exact)
            if new is not None:
                st = new
                touched.update((g1, g2))
        active = touched
        both = False
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


def mutate(prob: Problem, st: State, rng: np.random.Generator, swaps: int) -> tuple[list[list[int]], set[int]]:
    """``swaps`` random swaps between random groups; returns the groups and the touched ones."""
    groups = st.groups()
    touched: set[int] = set()
    for _ in range(swaps):
        g1, g2 = (int(x) for x in rng.choice(prob.p, size=2, replace=False))
        i1, i2 = (int(x) for x in rng.integers(0, prob.d, size=2))
        groups[g1][i1], groups[g2][i2] = groups[g2][i2], groups[g1][i1]
        touched.update((g1, g2))
    return groups, touched


def _key(prob: Problem, st: State) -> tuple:
    return tuple(sorted(st.keys))


@dataclass(frozen=True, slots=True)
class SearchResult:
    groups: list[list[int]]
    true: float
    evals: int
    generations: int
    timed_out: bool


def num_partitions(n: int, d: int) -> int:
    """Ways to split n devices into n // d unordered groups of d."""
    p = n // d
    return math.factorial(n) // (math.factorial(d) ** p * math.factorial(p))


def _partitions(items: list[int], size: int):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        chosen = set(others)
        left = [x for x in rest if x not in chosen]
        for tail in _partitions(left, size):
            yield [[first, *others], *tail]


def _exhaustive(prob: Problem, budget: Budget) -> SearchResult:
    """Every partition, scored exactly (small clusters). Ties: first in enumeration order."""
    best_groups, best_true = None, math.inf
    count = 0
    for groups in _partitions(list(range(prob.n)), prob.d):
        if count and budget.spent():
            break
        count += 1
        budget.evals += 1
        true, _ = prob.evaluate(groups)
        if true < best_true - 1e-12:
            best_groups, best_true = groups, true
    return SearchResult(best_groups, best_true, count, 0, budget.timed_out)


def search(
    prob: Problem,
    *,
    seed: int,
    time_budget_s: float,
    clock: Clock | None = None,
    population: int = 8,
    patience: int = 15,
    crossover_rate: float = 0.3,
    ls_evals: int = 2000,
    polish: int = 2,
    exhaustive_max: int = 600,
    max_evals: int = 2_000_000,
    max_generations: int = 400,
) -> SearchResult:
    """Best partition found (lowest true score)."""
    rng = np.random.default_rng(seed)
    budget = Budget(clock or SystemClock(), time_budget_s, max_evals)
    if prob.p == 1 or prob.d == 1 and prob.p <= 2:
        prob.exact_costs()
        groups = [list(range(prob.n))] if prob.p == 1 else [[x] for x in range(prob.n)]
        st = make_state(prob, groups)
        return SearchResult(st.groups(), st.true, 0, 0, False)
    if num_partitions(prob.n, prob.d) <= exhaustive_max:
        prob.exact_costs()
        return _exhaustive(prob, budget)

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
    # Local search from the best constructions; fill the population with a random partition
    # (diversity) and perturbed copies of the best (cheap to polish, close to good regions).
    pool = [local_search(prob, st, rng, budget, max_evals=ls_evals) for st in states[:polish]]
    pool += states[polish : population - 2]
    pool.append(local_search(prob, make_state(prob, construct.random_partition(prob, rng)), rng, budget, max_evals=ls_evals))
    while len(pool) < population and not budget.spent():
        groups, touched = mutate(prob, min(pool, key=lambda s: s.true), rng, int(rng.integers(2, 5)))
        pool.append(local_search(prob, make_state(prob, groups), rng, budget, active=touched, max_evals=ls_evals))
    best = min(pool, key=lambda s: s.true)
    log.debug("search initial best=%.6f evals=%d", best.true, budget.evals)

    gens = 0
    stale = 0
    while not budget.spent() and stale < patience and gens < max_generations:
        gens += 1
        i, j = (int(x) for x in rng.choice(len(pool), size=2, replace=False))
        pa = pool[i] if pool[i].surr <= pool[j].surr else pool[j]
        if rng.random() < crossover_rate:
            other = pool[int(rng.integers(0, len(pool)))]
            child_groups, touched = crossover(prob, pa, other, rng), None
        else:
            child_groups, touched = mutate(prob, pa, rng, int(rng.integers(1, 4)))
        child = local_search(prob, make_state(prob, child_groups), rng, budget, active=touched, max_evals=ls_evals // 2)
        if child.true < best.true - 1e-12:
            best = child
            stale = 0
        else:
            stale += 1
        keys = {_key(prob, s) for s in pool}
        worst = max(range(len(pool)), key=lambda k: (pool[k].surr, k))
        if _key(prob, child) not in keys and child.surr < pool[worst].surr:
            pool[worst] = child
    # the surrogate steers the search; finish with a descent on the objective itself
    prob.exact_costs()
    best = local_search(prob, make_state(prob, best.groups()), rng, budget, max_evals=ls_evals, exact=True)
    log.debug("search done best=%.6f evals=%d gens=%d timed_out=%s", best.true, budget.evals, gens, budget.timed_out)
    return SearchResult(best.groups(), best.true, budget.evals, gens, budget.timed_out)
