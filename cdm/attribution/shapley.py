"""Shard values by composition: leave-one-out, Shapley and Banzhaf values of shards (or sources).

In a CDM "the model trained without shards T" is the composition of the other shards, so a
coalition's value needs only sampling. ``CompositionGame`` turns ``property_of(shard_subset)``
into a memoised value function v (each coalition is evaluated once); the empty coalition's value
is given (e.g. the safe backbone's property). Values are exact by enumeration for small n
(2^n coalitions); beyond that, permutation sampling (Shapley; Castro et al. 2009) and maximum
sample reuse (Banzhaf; Wang & Jia 2023) estimate them with standard errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

MAX_EXACT_PLAYERS = 16


@dataclass
class CompositionGame:
    """v(T) = ``property_of(T)`` for a non-empty coalition T of ``players``, ``empty_value`` for {}.

    ``property_of`` receives the coalition as a tuple in ``players`` order ("compose these shards
    and measure the property"); each coalition is evaluated at most once (``evaluations`` counts).
    """

    property_of: Callable[[tuple], float]
    players: tuple
    empty_value: float
    cache: dict[frozenset, float] = field(default_factory=dict)
    evaluations: int = 0

    def __post_init__(self) -> None:
        self.players = tuple(self.players)
        if len(set(self.players)) != len(self.players):
            raise ValueError(f"CompositionGame: players must be distinct, got {self.players}")
        self.cache.setdefault(frozenset(), float(self.empty_value))

    def __call__(self, coalition: Sequence[Hashable] | frozenset) -> float:
        key = frozenset(coalition)
        unknown = key.difference(self.players)
        if unknown:
            raise KeyError(f"CompositionGame: {sorted(map(str, unknown))} are not players")
        if key not in self.cache:
            value = float(self.property_of(tuple(p for p in self.players if p in key)))
            if not math.isfinite(value):
                raise ValueError(f"CompositionGame: property of {sorted(map(str, key))} is {value}")
            self.cache[key] = value
            self.evaluations += 1
        return self.cache[key]


@dataclass(frozen=True, eq=False)
class ShardValues:
    """One value per player (``values[j]`` for ``players[j]``), its standard error (0 when exact),
    the method, and how many coalitions were evaluated to get it."""

    players: tuple
    values: np.ndarray
    stderr: np.ndarray
    method: str
    evaluations: int

    def as_dict(self) -> dict:
        return {p: float(v) for p, v in zip(self.players, self.values, strict=True)}


ValueFunction = Callable[[frozenset], float]


def check_exact_size(players: Sequence, method: str) -> None:
    """Refuse enumeration beyond ``MAX_EXACT_PLAYERS`` (2^n coalitions)."""
    if len(players) > MAX_EXACT_PLAYERS:
        raise ValueError(
            f"{method}: {len(players)} players need 2^{len(players)} coalitions; use "
            "permutation_shapley or msr_banzhaf beyond "
            f"{MAX_EXACT_PLAYERS} players"
        )


def count_evaluations(v: ValueFunction) -> int:
    """Coalitions evaluated so far by ``v`` (a ``CompositionGame``), else 0."""
    return int(getattr(v, "evaluations", 0))


def leave_one_out(v: ValueFunction, players: Sequence) -> ShardValues:
    """v(N) - v(N without i) for each player i."""
    everyone = frozenset(players)
    full = v(everyone)
    values = np.array([full - v(everyone - {p}) for p in players], dtype=np.float64)
    return ShardValues(tuple(players), values, np.zeros_like(values), "leave_one_out",
                       count_evaluations(v))  # fmt: skip


def exact_shapley(v: ValueFunction, players: Sequence) -> ShardValues:
    """Shapley values by enumeration: sum over T not containing i of
    |T|! (n-|T|-1)! / n! [v(T + i) - v(T)]."""
    check_exact_size(players, "exact_shapley")
    n = len(players)
    weight = [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    values = np.zeros(n, dtype=np.float64)
    for j, p in enumerate(players):
        others = [q for q in players if q != p]
        for size in range(n):
            for subset in combinations(others, size):
                t = frozenset(subset)
                values[j] += weight[size] * (v(t | {p}) - v(t))
    return ShardValues(tuple(players), values, np.zeros(n), "shapley", count_evaluations(v))


def exact_banzhaf(v: ValueFunction, players: Sequence) -> ShardValues:
    """Banzhaf values by enumeration: the mean over T not containing i of v(T + i) - v(T)."""
    check_exact_size(players, "exact_banzhaf")
    n = len(players)
    values = np.zeros(n, dtype=np.float64)
    for j, p in enumerate(players):
        others = [q for q in players if q != p]
        total = 0.0
        for size in range(n):
            for subset in combinations(others, size):
                t = frozenset(subset)
                total += v(t | {p}) - v(t)
        values[j] = total / 2 ** (n - 1)
    return ShardValues(tuple(players), values, np.zeros(n), "banzhaf", count_evaluations(v))


def permutation_shapley(
    v: ValueFunction, players: Sequence, *, n_permutations: int, seed: int = 0
) -> ShardValues:
    """Monte-Carlo Shapley values: mean marginal contribution over random player orders
    (``np.random.default_rng(seed)``); stderr = std (ddof=1) / sqrt(n_permutations)."""
    if n_permutations < 2:
        raise ValueError(f"permutation_shapley: need n_permutations >= 2, got {n_permutations}")
    n = len(players)
    rng = np.random.default_rng(seed)
    marginals = np.zeros((n_permutations, n), dtype=np.float64)
    for k in range(n_permutations):
        coalition: frozenset = frozenset()
        previous = v(coalition)
        for j in rng.permutation(n):
            coalition = coalition | {players[j]}
            value = v(coalition)
            marginals[k, j] = value - previous
            previous = value
    stderr = marginals.std(axis=0, ddof=1) / math.sqrt(n_permutations)
    return ShardValues(tuple(players), marginals.mean(axis=0), stderr, "shapley_permutation",
                       count_evaluations(v))  # fmt: skip


def msr_banzhaf(
    v: ValueFunction, players: Sequence, *, n_samples: int, seed: int = 0
) -> ShardValues:
    """Maximum-sample-reuse Banzhaf values (Wang & Jia 2023): draw coalitions with each player in
    w.p. 1/2 and take, per player, mean v over coalitions with it minus mean v over those without;
    stderr = sqrt(var_in / n_in + var_out / n_out)."""
    n = len(players)
    rng = np.random.default_rng(seed)
    member = rng.random((n_samples, n)) < 0.5
    values_of = np.array(
        [v(frozenset(p for p, m in zip(players, row, strict=True) if m)) for row in member]
    )
    values = np.zeros(n, dtype=np.float64)
    stderr = np.zeros(n, dtype=np.float64)
    for j in range(n):
        inside, outside = values_of[member[:, j]], values_of[~member[:, j]]
        if len(inside) < 2 or len(outside) < 2:
            raise ValueError(f"msr_banzhaf: n_samples={n_samples} is too few for every player")
        values[j] = inside.mean() - outside.mean()
        stderr[j] = math.sqrt(inside.var(ddof=1) / len(inside) + outside.var(ddof=1) / len(outside))
    return ShardValues(tuple(players), values, stderr, "banzhaf_msr", count_evaluations(v))
