"""Least squares with non-negative coefficients, from the normal equations.

Iteration-time models (PrefillProfile, ember.bench.sched_cost.CostModel) fit costs
that cannot be negative; with few distinct iterations an unconstrained fit trades one
term against another and a cost goes below zero. Lawson and Hanson's active-set
method solves  min |X c - y|^2  subject to c[i] >= 0  for every i not in `free`,
working on X'X and X'y alone, so an online fit keeps only those sums.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_RIDGE = 1e-9  # keeps a sub-system solvable when a feature was never seen (a zero column)


def _solve(xtx: np.ndarray, xty: np.ndarray, active: list[int]) -> np.ndarray:
    """The unconstrained solution over the `active` coefficients, zero elsewhere."""
    out = np.zeros(len(xty))
    if active:
        a = xtx[np.ix_(active, active)] + _RIDGE * np.eye(len(active))
        out[active] = np.linalg.lstsq(a, xty[active], rcond=None)[0]
    return out


def nonnegative_lstsq(xtx: np.ndarray, xty: np.ndarray, free: Iterable[int] = ()) -> np.ndarray:
    """Coefficients c minimising |X c - y|^2 given X'X [n, n] and X'y [n], with
    c[i] >= 0 for every i not in `free` (those may take any sign)."""
    n = len(xty)
    unconstrained = set(free)
    everything = _solve(xtx, xty, list(range(n)))
    if all(everything[i] >= 0 for i in range(n) if i not in unconstrained):
        return everything  # the unconstrained optimum is feasible: it is the answer
    active = sorted(unconstrained)  # the coefficients allowed off zero
    coef = _solve(xtx, xty, active)
    tol = 1e-12 * max(1.0, float(np.abs(xty).max(initial=0.0)))
    for _ in range(3 * n + 3):  # each pass adds a coefficient; a few more for the drops
        gradient = xty - xtx @ coef  # the descent direction of every coefficient
        candidates = [j for j in range(n) if j not in active and gradient[j] > tol]
        if not candidates:
            break
        active.append(max(candidates, key=lambda j: gradient[j]))
        coef = _feasible(xtx, xty, active, coef, unconstrained)
    return coef


def _feasible(
    xtx: np.ndarray, xty: np.ndarray, active: list[int], coef: np.ndarray, unconstrained: set[int]
) -> np.ndarray:
    """Solve over `active`, stepping back towards `coef` and dropping the constrained
    coefficients that would go negative until the solution is feasible (in place on
    `active`)."""
    while True:
        z = _solve(xtx, xty, active)
        negative = [j for j in active if j not in unconstrained and z[j] <= 0]
        if not negative:
            return z
        step = min(coef[j] / (coef[j] - z[j]) if coef[j] > z[j] else 0.0 for j in negative)
        coef = coef + step * (z - coef)
        for j in [j for j in active if j not in unconstrained and coef[j] <= 1e-15]:
            active.remove(j)
            coef[j] = 0.0
