"""Closed-form least-squares restoration of a consumer linear after some of its input columns are cut.

The kept columns S are refit from calibration statistics alone (never a token matrix):

    argmin_{W_S, b'} || X_p[S] W_S^T + 1 b'^T - (X_t W^T + 1 b^T) ||^2 + lambda || W_S - prior ||^2

- target "pruned" (the FASP paper): X_t = X_p, the consumer's input in the model pruned so far; the fit
  corrects only this layer's cut. Normal equations from G = X_p^T X_p.
- target "dense": X_t = X_d, the consumer's input in the dense model on the same tokens; the fit also
  corrects the error that earlier blocks carried in. Needs the cross-Gram X_p^T X_d beside G.
- intercept: b' is fitted too (a constant input column), which subsumes FLAP's bias compensation: inputs
  that were constant are absorbed exactly. Without it b' = b.
- lambda = damping * mean(diag G[S, S]); prior W[:, S] ("original") or 0 ("zero"); the intercept is not damped.

`choose_damping` picks the damping by held-out reconstruction error over folds of calibration windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibrate import InputStats
from .errors import PruningError

TARGETS = ("pruned", "dense")
DAMPING_TOWARD = ("original", "zero")
# damping fractions a held-out choice considers: 1e-3 is nearly the plain least-squares fit, 10 nearly plain
# slicing (toward the original weights) or shrinkage to zero
DAMPING_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
_ROWS = 1024  # kept rows of the cross-Gram multiplied at once


@dataclass
class NormalEquations:
    """lhs theta = rhs for theta = [W_S^T; b'^T] (the last row only with an intercept)."""

    lhs: torch.Tensor  # [k (+1), k (+1)]
    rhs: torch.Tensor  # [k (+1), out]
    prior: torch.Tensor  # [k (+1), out]: what damping pulls theta toward
    penalized: torch.Tensor  # bool [k (+1)]: the rows that are damped (not the intercept)
    scale: float  # mean diag G[S, S]: damping is relative to it


def check_options(target: str = "pruned", toward: str = "original") -> None:
    if target not in TARGETS:
        raise PruningError(f"unknown restoration target {target!r}: choose {' or '.join(TARGETS)}")
    if toward not in DAMPING_TOWARD:
        raise PruningError(f"unknown damping target {toward!r}: choose {' or '.join(DAMPING_TOWARD)}")


def normal_equations(weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStats, keep: torch.Tensor,
                     target: str = "pruned", intercept: bool = False, toward: str = "original") -> NormalEquations:
    """The equations over all of `stats`' tokens: the sum of each fold's, so the full [n, n] Gram and
    cross-Gram of folded statistics are never added up."""
    check_options(target, toward)
    return _summed([_fold_equations(weight, bias, stats.fold(k), keep, target, intercept, toward)
                    for k in range(stats.folds)])


def _fold_equations(weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStats, keep: torch.Tensor,
                    target: str, intercept: bool, toward: str) -> NormalEquations:
    w = weight.double()
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else bias.double()
    gram = stats.gram
    if target == "dense":
        if stats.cross is None:
            raise PruningError("dense-target restoration needs statistics collected with the dense model's inputs")
        cross, target_sum = stats.cross, stats.dense_sum
    else:
        cross, target_sum = gram, stats.sum
    # indexed and multiplied without a [|S|, n] copy of the Gram (half a GB for an 8960-wide FFN input)
    lhs = gram[keep[:, None], keep[None, :]]
    rhs = torch.cat([cross[rows] @ w.T for rows in keep.split(_ROWS)]) if len(keep) else cross[keep] @ w.T
    # X_p[S]^T X_t W^T
    prior = w[:, keep].T if toward == "original" else torch.zeros_like(rhs)
    penalized = torch.ones(len(keep), dtype=torch.bool, device=w.device)
    scale = lhs.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny).item() if len(keep) else 1.0
    if intercept:
        kept_sum = stats.sum[keep]
        lhs = torch.cat([torch.cat([lhs, kept_sum[:, None]], 1),
                         torch.cat([kept_sum, lhs.new_tensor([stats.count])])[None]], 0)
        rhs = torch.cat([rhs + kept_sum[:, None] * b[None], (target_sum @ w.T + stats.count * b)[None]], 0)
        prior = torch.cat([prior, b[None]], 0)
        penalized = torch.cat([penalized, penalized.new_zeros(1)])
    # without an intercept b' = b, which cancels from both sides
    return NormalEquations(lhs, rhs, prior, penalized, scale)


def _summed(eqs: list[NormalEquations]) -> NormalEquations:
    """The equations of the union of the tokens behind `eqs` (statistics add; the prior is the same)."""
    if len(eqs) == 1:
        return eqs[0]
    return NormalEquations(sum(eq.lhs for eq in eqs), sum(eq.rhs for eq in eqs), eqs[0].prior, eqs[0].penalized,
                           sum(eq.scale for eq in eqs))


def solve(eq: NormalEquations, damping: float, in_place: bool = False) -> torch.Tensor | None:
    """theta of the damped equations. `in_place`: damp and factor eq.lhs itself (the caller's last use of it),
    so no second [k, k] matrix is made; then None where the damped system is singular (eq.lhs is spent, and
    the least-norm fallback needs it whole: build the equations again and solve without `in_place`)."""
    if not len(eq.lhs):  # every column cut and no intercept: nothing to fit
        return eq.rhs
    lam = damping * eq.scale
    d = eq.penalized.double() * lam
    rhs = eq.rhs + d[:, None] * eq.prior
    # The damped system, factored in place and solved by two triangular solves: one [k, k] matrix beside eq.lhs.
    # (cholesky_ex and cholesky_solve on a row-major matrix each copy it to column-major order first; a
    # symmetric matrix's transpose view already is its column-major copy. 1.2 GB less for k = 7168.)
    if in_place:
        eq.lhs.diagonal().add_(d)
    lower = (eq.lhs if in_place else _damped(eq.lhs, d)).mT
    info = torch.empty((), dtype=torch.int32, device=lower.device)
    torch.linalg.cholesky_ex(lower, out=(lower, info))
    if info.item() == 0:
        half = torch.linalg.solve_triangular(lower, rhs, upper=False)
        return torch.linalg.solve_triangular(lower.mT, half, upper=True)
    if in_place:
        return None
    # Numerically singular even after damping: the least-norm solution, from the symmetric pseudo-inverse (on
    # every device; torch.linalg.lstsq's default CPU driver gave answers that changed from call to call here).
    del lower
    return torch.linalg.pinv(_damped(eq.lhs, d), hermitian=True) @ rhs


def _damped(lhs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    damped = lhs.clone()
    damped.diagonal().add_(d)
    return damped


def heldout_error(eq: NormalEquations, theta: torch.Tensor) -> float:
    """||X theta - Y||^2 on the tokens `eq` was built from, less ||Y||^2 (the same for every theta)."""
    return ((theta * (eq.lhs @ theta)).sum() - 2 * (theta * eq.rhs).sum()).item()


def choose_damping(weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStats, keep: torch.Tensor,
                   target: str, intercept: bool, toward: str, grid: tuple[float, ...] = DAMPING_GRID) -> float:
    """The damping in `grid` with the least reconstruction error on held-out calibration windows: fit on all
    folds but one, measure on that one, summed over folds (`stats` must have been collected with folds > 1)."""
    if stats.folds < 2:
        raise PruningError("choosing the damping needs calibration statistics kept in folds (folds=2)")
    check_options(target, toward)
    folds = [_fold_equations(weight, bias, stats.fold(k), keep, target, intercept, toward) for k in range(stats.folds)]
    fits = [_summed([eq for j, eq in enumerate(folds) if j != k]) for k in range(stats.folds)]
    errors = [sum(heldout_error(folds[k], solve(fits[k], damping)) for k in range(stats.folds)) for damping in grid]
    return grid[min(range(len(grid)), key=errors.__getitem__)]


def restore(weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStats, keep: torch.Tensor,
            damping: float = 0.1, toward: str = "original", target: str = "pruned", intercept: bool = False,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The consumer's refit weight on `keep` and its bias (refit with `intercept`, else unchanged)."""
    theta = solve(normal_equations(weight, bias, stats, keep, target, intercept, toward), damping, in_place=True)
    if theta is None:
        theta = solve(normal_equations(weight, bias, stats, keep, target, intercept, toward), damping)
    new_weight = theta[:len(keep)].T.to(weight.dtype)
    if not intercept:
        return new_weight, bias
    return new_weight, theta[len(keep)].to(weight.dtype)
