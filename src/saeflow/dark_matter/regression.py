"""Streaming least squares and R² in float64, O(d²) memory, one pass over the rows per quantity.

The Dark Matter code (seed 000, ``utils.run_lstsq``) loads every row, shuffles them without a
seed, fits ``torch.linalg.lstsq`` in float32 on the first 150k rows **without a bias column**
(the paper says bias terms are included) and reports R² on the next 150k. Here:

- :class:`NormalEquations` accumulates the sufficient statistics of a linear fit with a bias
  column, chunk by chunk: n, Σx̃, Σỹ, Σỹ² (per output dim), X̃ᵀX̃ and X̃ᵀỸ, in float64. Rows are
  shifted by the first chunk's mean before accumulating (x̃ = x − s_x, ỹ = y − s_y). The shift
  changes no fit; it removes the cancellation that raw sums of squares suffer when a dimension's
  mean dwarfs its spread (residual streams have a few "massive" dimensions).
- :meth:`NormalEquations.solve` eliminates the bias column analytically: the Schur complement of
  the (d+1)×(d+1) normal equations [[XᵀX, Σx], [Σxᵀ, n]] is the centred scatter matrix
  S_xx = Σ(x − x̄)(x − x̄)ᵀ, so W = S_xx⁻¹ S_xy and b = ȳ − x̄ W is the same solution with a
  smaller, better-conditioned system. Cholesky first; if it fails or is numerically singular
  (fewer rows than dims, a constant dim), the minimum-norm solution from an eigendecomposition,
  which is what ``lstsq`` with an rcond returns.
- :class:`R2Accumulator` gives R² per output dim (1 − SSres/SStot, SStot around the evaluation
  set's own mean per dim, as the original ``calculate_r_squared``), their mean, and the pooled
  R² = 1 − ΣSSres/ΣSStot = 1 − FVU. Means and sums of squares are merged chunk by chunk with
  Chan et al.'s pairwise update, so no raw Σy² − nȳ² cancellation occurs.
- :func:`split_mask` is a seeded, deterministic train/test split of token rows.

Solving normal equations squares the condition number of X compared with QR; float64 keeps
about 16 − 2·log10(cond(X)) correct digits, ample for activations (cond(X) is rarely above 1e4).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

F64 = torch.float64


class LinearFit(NamedTuple):
    """A fitted affine map, y ≈ x @ weight + bias."""

    weight: Tensor  # [d_in, d_out] float64
    bias: Tensor  # [d_out] float64 (zeros for a fit without intercept)
    solver: str  # "cholesky", or "eigh-pinv" when the system was singular


class R2Result(NamedTuple):
    """Coefficient of determination of a prediction, per output dim and pooled."""

    per_dim: Tensor  # [d] float64; 1 - ss_res / ss_tot, NaN where ss_tot == 0
    mean: float  # mean of per_dim over dims with ss_tot > 0 (the Dark Matter code's R²)
    pooled: float  # 1 - sum(ss_res) / sum(ss_tot) = 1 - FVU
    ss_res: Tensor  # [d] float64, sum over rows of (y - y_hat)^2
    ss_tot: Tensor  # [d] float64, sum over rows of (y - mean(y))^2
    n: int  # rows

    @property
    def fvu(self) -> float:
        """Fraction of variance unexplained, pooled over dims: sum(ss_res) / sum(ss_tot)."""
        return float(self.ss_res.sum() / self.ss_tot.sum())


def r2_result(ss_res: Tensor, ss_tot: Tensor, n: int) -> R2Result:
    """Assemble an :class:`R2Result` from per-dim sums of squares."""
    ok = ss_tot > 0
    per_dim = torch.where(ok, 1 - ss_res / torch.where(ok, ss_tot, 1.0), torch.nan)
    mean = float(per_dim[ok].mean()) if bool(ok.any()) else float("nan")
    pooled = float(1 - ss_res.sum() / ss_tot.sum()) if bool(ok.any()) else float("nan")
    return R2Result(per_dim, mean, pooled, ss_res, ss_tot, n)


def predict(fit: LinearFit, x: Tensor) -> Tensor:
    """x [n, d_in] -> x @ weight + bias [n, d_out], computed and returned in float64."""
    return torch.addmm(fit.bias, x.to(F64), fit.weight)


class NormalEquations:
    """Streaming sufficient statistics for least squares of y [n, d_out] on [x, 1] [n, d_in + 1].

    Memory is O(d_in·(d_in + d_out)) whatever the number of rows; the result does not depend on
    how the rows are chunked, up to float64 rounding.
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        self.d_in, self.d_out, self.n = d_in, d_out, 0
        self.shift_x = torch.zeros(d_in, dtype=F64)
        self.shift_y = torch.zeros(d_out, dtype=F64)
        self.sum_x = torch.zeros(d_in, dtype=F64)
        self.sum_y = torch.zeros(d_out, dtype=F64)
        self.sum_yy = torch.zeros(d_out, dtype=F64)  # Σỹ² per output dim (diag of ỸᵀỸ)
        self.xtx = torch.zeros(d_in, d_in, dtype=F64)
        self.xty = torch.zeros(d_in, d_out, dtype=F64)

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add a chunk of rows: x [m, d_in], y [m, d_out] (any float dtype)."""
        if x.ndim != 2 or y.ndim != 2 or x.shape != (y.shape[0], self.d_in) \
                or y.shape[1] != self.d_out:
            raise ValueError(f"expected x [m, {self.d_in}] and y [m, {self.d_out}], "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[0] == 0:
            return
        x64, y64 = x.to(F64, copy=True), y.to(F64, copy=True)
        if self.n == 0:
            self.shift_x, self.shift_y = x64.mean(0), y64.mean(0)
        x64.sub_(self.shift_x)
        y64.sub_(self.shift_y)
        self.n += x.shape[0]
        self.sum_x += x64.sum(0)
        self.sum_y += y64.sum(0)
        self.sum_yy += y64.square().sum(0)
        self.xtx.addmm_(x64.T, x64)
        self.xty.addmm_(x64.T, y64)

    def scatter(self, intercept: bool = True) -> tuple[Tensor, Tensor]:
        """(S_xx [d_in, d_in], S_xy [d_in, d_out]): centred sums if ``intercept``, else raw."""
        n, sx, sy = self.n, self.sum_x, self.sum_y
        if intercept:
            mx = sx / n
            return self.xtx - n * torch.outer(mx, mx), self.xty - torch.outer(mx, sy)
        # about zero: x = x̃ + s_x, so Σxxᵀ = X̃ᵀX̃ + s_x Σx̃ᵀ + Σx̃ s_xᵀ + n s_x s_xᵀ
        hx, hy = self.shift_x, self.shift_y
        xx = self.xtx + torch.outer(hx, sx) + torch.outer(sx, hx) + n * torch.outer(hx, hx)
        xy = self.xty + torch.outer(hx, sy) + torch.outer(sx, hy) + n * torch.outer(hx, hy)
        return xx, xy

    def solve(self, ridge: float = 0.0, intercept: bool = True) -> LinearFit:
        """Least-squares fit; ``ridge`` (>= 0) is added to the diagonal of S_xx.

        ``ridge`` is in the units of S_xx (a sum over rows); the bias is never penalised.
        ``intercept=False`` reproduces the original code's fit through the origin.
        """
        if self.n == 0:
            raise ValueError("NormalEquations.solve: no rows were added")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        sxx, sxy = self.scatter(intercept)
        sxx = 0.5 * (sxx + sxx.T) + ridge * torch.eye(self.d_in, dtype=F64)
        weight, solver = solve_psd(sxx, sxy)
        if intercept:
            bias = (self.sum_y / self.n + self.shift_y) - (self.sum_x / self.n + self.shift_x) @ weight
        else:
            bias = torch.zeros(self.d_out, dtype=F64)
        return LinearFit(weight, bias, solver)

    def r2(self, fit: LinearFit) -> R2Result:
        """In-sample R² of ``fit`` on the accumulated rows, from the sums alone (no second pass).

        Precision degrades as R² -> 1 (SSres is a difference of sums); use
        :class:`R2Accumulator` on held-out rows for reported numbers.
        """
        w = fit.weight
        beta = fit.bias + self.shift_x @ w - self.shift_y  # the bias in shifted coordinates
        quad = (w * (self.xtx @ w)).sum(0)
        ss_res = (self.sum_yy - 2 * (w * self.xty).sum(0) + quad - 2 * beta * self.sum_y
                  + 2 * beta * (self.sum_x @ w) + self.n * beta.square())
        ss_tot = self.sum_yy - self.sum_y.square() / self.n
        return r2_result(ss_res.clamp_min(0), ss_tot, self.n)


def solve_psd(a: Tensor, b: Tensor) -> tuple[Tensor, str]:
    """Solve a x = b for symmetric positive semi-definite ``a`` [d, d] (float64), b [d, k].

    Cholesky when ``a`` is numerically positive definite; otherwise the minimum-norm solution
    via eigh with eigenvalues below d·eps·max(eig) dropped (lstsq's rcond rule).
    """
    d = a.shape[0]
    eps = torch.finfo(a.dtype).eps
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        diag = chol.diagonal()
        # (min/max of diag(L))² is a cheap lower bound on 1/cond(a): reject near-singular systems
        if float(diag.min() / diag.max()) ** 2 > d * eps:
            return torch.cholesky_solve(b, chol), "cholesky"
    evals, evecs = torch.linalg.eigh(a)
    cutoff = d * eps * float(evals.abs().max())
    inv = torch.where(evals > cutoff, 1 / evals.clamp_min(cutoff), 0.0)
    return evecs @ (inv[:, None] * (evecs.T @ b)), "eigh-pinv"


class R2Accumulator:
    """Streaming R² of predictions y_hat of y, per dim and pooled, over chunks of rows."""

    def __init__(self, d: int) -> None:
        self.d, self.n = d, 0
        self.mean = torch.zeros(d, dtype=F64)
        self.m2 = torch.zeros(d, dtype=F64)  # Σ(y - mean)², merged pairwise (Chan et al. 1979)
        self.ss_res = torch.zeros(d, dtype=F64)

    def update(self, y: Tensor, y_hat: Tensor) -> None:
        """Add a chunk: targets y and predictions y_hat, both [m, d]."""
        if y.shape != y_hat.shape or y.ndim != 2 or y.shape[1] != self.d:
            raise ValueError(f"expected y and y_hat [m, {self.d}], got {tuple(y.shape)} "
                             f"and {tuple(y_hat.shape)}")
        m = y.shape[0]
        if m == 0:
            return
        y64 = y.to(F64)
        self.ss_res += (y64 - y_hat.to(F64)).square().sum(0)
        chunk_mean = y64.mean(0)
        chunk_m2 = (y64 - chunk_mean).square().sum(0)
        delta, total = chunk_mean - self.mean, self.n + m
        self.mean += delta * (m / total)
        self.m2 += chunk_m2 + delta.square() * (self.n * m / total)
        self.n = total

    def result(self) -> R2Result:
        return r2_result(self.ss_res.clone(), self.m2.clone(), self.n)


def split_mask(n: int, test_fraction: float, seed: int) -> Tensor:
    """Bool [n]: True for the round(n·test_fraction) test rows of a seeded random split.

    Deterministic for a given (n, test_fraction, seed) and torch version (torch.randperm on a
    dedicated generator). The original shuffled with an unseeded ``torch.randperm``.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[perm[: round(n * test_fraction)]] = True
    return mask
